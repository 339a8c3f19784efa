"""The toy world's stand-in for the Wan VAE: a space-to-depth pixel codec, exact or projected.

It speaks the part of the ``AutoencoderKLWan`` interface that diffusers' Wan / AnyFlow pipelines
use (``config.z_dim``, ``latents_mean``, ``latents_std``, ``scale_factor_spatial``,
``scale_factor_temporal``, ``_encode`` returning moments, ``encode`` / ``decode``), so a toy model
folder is loaded and decoded by the stock pipelines exactly like a real Wan folder.

Latents are per-channel normalised with the stored mean/std, so the flow sees unit-scale data.

``anchor_first_frame`` makes the first latent frame differ in kind from the rest, as it does in the
real Wan VAE (its causal encoder gives frame 0 a latent of its own, every later latent covers four
frames): frame 0 is stored negated about the channel mean. Wan's transformer has only relative
(rotary) positions, so without such an anchor nothing in a clip tells it which end comes first, and a
clip played backwards is as likely as the clip itself (README, teacher provenance).

``first_frame_offset`` is a gentler anchor: frame 0 is shifted by that many channel standard
deviations instead of negated. Negation flips the digit's sign (a bright digit is about +6 in the
normalised space, the black background -0.2), so a network has to relearn the subject's appearance for
one frame; an offset leaves the shape as it is and asks only for a position-dependent constant, which
is still what a prediction from pure noise must get right, so the network still needs to know which
frame is first.

``channels`` projects each normalised 4x4 block (48 values) onto a fixed orthonormal basis of its
``channels`` leading directions (fitted on training clips; :func:`fit_codec`): a lossy codec, as
Wan's VAE is. It is there for the transformer's sake. A ``WanTransformer3DModel``'s output for one
token is ``proj_out`` applied to its hidden state, so it spans at most ``inner_dim`` directions of the
token's ``out_channels * prod(patch_size)`` values; the toy's 128 against the exact codec's 48 x 4 =
192 leaves 64 directions in which every sampler's update is a constant, so a third of the initial
noise reaches every sample unchanged, whatever the step count (``scripts/output_rank_check.py``).
Wan itself has room to spare (1536 or 5120 against 16 x 4 = 64); 28 channels (112 per token,
within the 127 directions the final LayerNorm leaves) give the toy room too.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


class SpaceToDepthCodec(ModelMixin, ConfigMixin):
    """Pixels (B, C, F, H, W) in [-1, 1] <-> latents (B, Z, F, H/p, W/p).

    Exact (``channels`` None): Z = C*p*p, a bit-exact round trip. Projected: Z = ``channels``, the
    coordinates of the normalised block in ``basis``; the round trip is the orthogonal projection.

    ``latents_mean`` / ``latents_std`` follow Wan's convention: the pipeline maps a normalised latent
    ``z`` back to codec space as ``z * std + mean`` before calling :meth:`decode`. A projected codec
    normalises before it projects (``pixel_mean`` / ``pixel_std``, per block channel), so its
    ``latents_mean`` / ``latents_std`` are 0 / 1.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        patch: int = 4,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        # Derived, stored for the pipelines that read them; any value passed is recomputed.
        z_dim: int | None = None,
        scale_factor_spatial: int | None = None,
        scale_factor_temporal: int = 1,
        anchor_first_frame: bool = False,
        first_frame_offset: float = 0.0,
        channels: int | None = None,
        basis: list[list[float]] | None = None,
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
    ):
        super().__init__()
        block = in_channels * patch * patch
        z_dim = block if channels is None else int(channels)
        if channels is not None:
            if basis is None or len(basis) != z_dim or any(len(row) != block for row in basis):
                raise ValueError(f"a codec with channels={channels} needs a basis of {channels} rows of {block}")
            if pixel_mean is None or pixel_std is None or len(pixel_mean) != block or len(pixel_std) != block:
                raise ValueError(f"a codec with channels={channels} needs pixel_mean and pixel_std of {block}")
            b = torch.tensor(basis, dtype=torch.float64)
            # Decoding uses the transpose as the inverse: only an orthonormal basis round-trips.
            if not torch.allclose(b @ b.T, torch.eye(z_dim, dtype=torch.float64), atol=1e-6):
                raise ValueError("the codec's basis rows are not orthonormal")
        self.register_to_config(
            z_dim=z_dim,
            scale_factor_spatial=patch,
            scale_factor_temporal=1,
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z_dim,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * z_dim,
        )
        # Parameter-free, but diffusers' save/load wants a weights file: one persistent buffer
        # (also the dtype/device anchor ModelMixin needs).
        self.register_buffer("anchor", torch.zeros(1))

    # -- raw transforms (no normalisation) -------------------------------------------------------
    def space_to_depth(self, video: torch.Tensor) -> torch.Tensor:
        p = self.config.patch
        b, c, f, h, w = video.shape
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not divisible by the codec patch {p}")
        x = video.reshape(b, c, f, h // p, p, w // p, p)
        return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)

    def depth_to_space(self, latents: torch.Tensor) -> torch.Tensor:
        p = self.config.patch
        b, z, f, h, w = latents.shape
        c = z // (p * p)
        x = latents.reshape(b, c, p, p, f, h, w)
        return x.permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c, f, h * p, w * p)

    def reflect_first_frame(self, z: torch.Tensor) -> torch.Tensor:
        """Codec-space latents (B, Z, F, h, w) with frame 0 reflected about the channel mean, so that
        the normalised frame 0 is negated. An involution (its own inverse); identity when off."""
        if not self.config.anchor_first_frame or z.shape[2] == 0:
            return z
        mean, _ = self._pixel_stats(z)
        first = 2.0 * mean[:, :, 0] - z[:, :, 0]
        return torch.cat([first.unsqueeze(2).to(z.dtype), z[:, :, 1:]], dim=2)

    def offset_first_frame(self, z: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """Codec-space latents with ``sign * first_frame_offset`` channel stds added to frame 0
        (+1 when encoding, -1 when decoding). Identity when the offset is 0."""
        c = float(self.config.first_frame_offset)
        if c == 0.0 or z.shape[2] == 0:
            return z
        _, std = self._pixel_stats(z)
        first = z[:, :, 0] + sign * c * std[:, :, 0]
        return torch.cat([first.unsqueeze(2).to(z.dtype), z[:, :, 1:]], dim=2)

    @property
    def projected(self) -> bool:
        return self.config.channels is not None

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Block values (B, C*p*p, F, h, w), marked, in codec units -> basis coordinates (B, Z, F, h, w)."""
        if not self.projected:
            return z
        mean, std = self._pixel_stats(z)
        return torch.einsum("kc,bcfhw->bkfhw", self._basis_on(z.device), (z.float() - mean) / std)

    def unproject(self, y: torch.Tensor) -> torch.Tensor:
        """Basis coordinates -> block values in codec units (the projection of the encoded block)."""
        if not self.projected:
            return y
        mean, std = self._pixel_stats(y)
        return torch.einsum("kc,bkfhw->bcfhw", self._basis_on(y.device), y.float()) * std + mean

    def _basis_on(self, device) -> torch.Tensor:
        """The basis as a float32 tensor on ``device``, built once per device: every encode and decode of
        a training step reads it, and the config holds it as nested lists."""
        cache = self.__dict__.setdefault("_basis_cache", {})
        if device not in cache:
            cache[device] = torch.tensor(self.config.basis, device=device, dtype=torch.float32)
        return cache[device]

    def mark_first_frame(self, z: torch.Tensor) -> torch.Tensor:
        return self.offset_first_frame(self.reflect_first_frame(z), 1.0)

    def unmark_first_frame(self, z: torch.Tensor) -> torch.Tensor:
        return self.reflect_first_frame(self.offset_first_frame(z, -1.0))

    # -- AutoencoderKLWan-compatible API -----------------------------------------------------------
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        mu = self.project(self.mark_first_frame(self.space_to_depth(video)))
        # Zero log-variance moments: the posterior is a point mass (mean == mode == sample).
        return torch.cat([mu, torch.full_like(mu, -30.0)], dim=1)

    def encode(self, video: torch.Tensor, return_dict: bool = True):
        posterior = DiagonalGaussianDistribution(self._encode(video))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        video = self.depth_to_space(self.unmark_first_frame(self.unproject(latents))).clamp(-1.0, 1.0)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    # -- normalised latents, the space the transformer lives in ----------------------------------
    def _stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.latents_mean, device=ref.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.config.latents_std, device=ref.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        return mean, std

    def _pixel_stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block channel statistics: the first-frame offset's unit and, projected, the normalisation."""
        if not self.projected:
            return self._stats(ref)
        mean = torch.tensor(self.config.pixel_mean, device=ref.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.config.pixel_std, device=ref.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        return mean, std

    def pixels_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) pixels -> normalised latents (B, F, Z, h, w), the AnyFlow layout."""
        z = self.project(self.mark_first_frame(self.space_to_depth(video.permute(0, 2, 1, 3, 4).float())))
        mean, std = self._stats(z)
        return ((z - mean) / std).permute(0, 2, 1, 3, 4)

    def latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, F, Z, h, w) -> pixels (B, F, C, H, W) in [-1, 1]."""
        z = latents.permute(0, 2, 1, 3, 4).float()
        mean, std = self._stats(z)
        return self.decode(z * std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)


def fit_codec(videos: torch.Tensor, patch: int = 4, anchor_first_frame: bool = False,
              first_frame_offset: float = 0.0, channels: int | None = None) -> SpaceToDepthCodec:
    """A codec whose per-channel statistics are measured on ``videos`` (B, F, C, H, W) pixels, and,
    with ``channels``, whose basis is fitted on them too (:func:`project_codec`).

    Statistics are pooled over the p*p sub-pixels of each colour channel, so that every latent
    channel of one colour shares a mean and std (the codec stays translation-equivariant).
    """
    c = videos.shape[2]
    flat = videos.permute(2, 0, 1, 3, 4).reshape(c, -1).double()
    mean = flat.mean(1).repeat_interleave(patch * patch)
    std = flat.std(1).clamp_min(1e-3).repeat_interleave(patch * patch)
    exact = SpaceToDepthCodec(in_channels=c, patch=patch, latents_mean=mean.tolist(), latents_std=std.tolist(),
                              anchor_first_frame=anchor_first_frame, first_frame_offset=first_frame_offset)
    return exact if channels is None else project_codec(exact, videos, channels)


def block_basis(blocks: torch.Tensor, channels: int) -> torch.Tensor:
    """The ``channels`` leading eigenvectors (rows) of the second moment of ``blocks`` (N, D): the
    orthonormal basis whose projection keeps the most of the blocks' energy. Each row's largest
    entry is positive, so a refit on the same data gives the same basis."""
    blocks = blocks.double()
    _, vecs = torch.linalg.eigh(blocks.T @ blocks / len(blocks))
    rows = vecs.flip(1)[:, :channels].T
    sign = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))
    return rows * sign


def project_codec(exact: SpaceToDepthCodec, videos: torch.Tensor, channels: int) -> SpaceToDepthCodec:
    """The projected twin of an exact codec: the same normalisation and first-frame mark, then the
    basis of ``channels`` directions fitted on ``videos`` (B, F, C, H, W) pixels. Its latents are the
    exact codec's normalised latents ``x`` seen through the basis, ``basis @ x`` per position, which
    is what lets a transformer trained on the exact codec be carried over (``toy.project_transformer``)."""
    if exact.projected:
        raise ValueError("the codec is projected already")
    block = exact.config.z_dim
    if not 0 < channels < block:
        raise ValueError(f"channels must be between 1 and {block - 1}, got {channels}")
    x = exact.pixels_to_latents(videos.float())  # (B, F, block, h, w)
    basis = block_basis(x.permute(0, 1, 3, 4, 2).reshape(-1, block), channels)
    cfg = {k: v for k, v in dict(exact.config).items() if not k.startswith("_")}
    cfg.update(channels=channels, basis=basis.tolist(), pixel_mean=list(cfg["latents_mean"]),
               pixel_std=list(cfg["latents_std"]), latents_mean=[0.0] * channels, latents_std=[1.0] * channels,
               z_dim=None)
    return SpaceToDepthCodec(**cfg)
