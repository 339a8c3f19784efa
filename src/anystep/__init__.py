"""anystep: AnyFlow any-step video diffusion distillation with flow maps, on diffusers."""

__version__ = "0.1.0"

# Exported at the top level because diffusers resolves a folder's component by
# (library, class) = ("anystep", "SpaceToDepthCodec") when it loads the toy model's codec.
from anystep.models.codec import SpaceToDepthCodec  # noqa: E402,F401
