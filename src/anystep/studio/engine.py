"""What the studio page asks of a model: checked inputs in, an mp4 with its timing out.

Nothing here imports Gradio, so the checks and the generation path are tested without a browser.
Generation goes through the toolkit's own functions, the ones ``anystep generate`` calls, so a
clip made here is the clip that the command shown under it makes; every call into them is in
:func:`_clip_latents` and :func:`_to_pixels`, the one place to re-point if generation moves.
"""

from __future__ import annotations

import itertools
import queue
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from anystep.conditioning import context_latents, read_frames
from anystep.errors import UserError
from anystep.io import write_mp4
from anystep.sampling import generate_latents, latents_to_video, nfe

MAX_STEPS = 50
COMPARE_STEPS = (1, 2, 4, 8, 32)
FPS = 4  # the `anystep generate` default, so the shown command reproduces the clip
HEIGHT = WIDTH = 32  # likewise


class StudioInputError(UserError, ValueError):
    """Input the page cannot use; its one-line message is shown in the page."""


def check_prompt(prompt) -> str:
    text = (prompt or "").strip()
    if not text:
        raise StudioInputError("the prompt is empty: type what the clip should show")
    return text


def check_steps(steps) -> int:
    try:
        value = float(steps)
    except (TypeError, ValueError):
        raise StudioInputError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}") from None
    if value != int(value) or not 1 <= value <= MAX_STEPS:
        raise StudioInputError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {value:g}")
    return int(value)


def check_seed(seed) -> int:
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise StudioInputError(f"the seed must be a whole number >= 0, got {seed!r}") from None
    if value != int(value) or value < 0:
        raise StudioInputError(f"the seed must be a whole number >= 0, got {value:g}")
    return int(value)


@dataclass
class Clip:
    path: Path
    seconds: float  # wall time of sampling and decoding (the mp4 encode is not counted)
    nfe: int
    steps: int
    frames: int
    command: str  # the `anystep generate` line that writes the same clip

    @property
    def duration(self) -> float:
        return self.frames / FPS


@dataclass
class Chunk:
    index: int  # 0-based
    count: int
    seconds: float  # this chunk alone
    clip: Clip  # the clip so far (its seconds: every chunk up to this one)


class StudioModel:
    """One loaded folder, used by one request at a time (a second request waits for the lock)."""

    def __init__(self, loaded, out_dir: Path):
        self.loaded = loaded
        self.folder = str(Path(loaded.folder).resolve())
        self.name = Path(loaded.folder).name
        self.lock = threading.Lock()
        self._out_dir = Path(out_dir)
        self._serial = itertools.count(1)

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @property
    def is_far(self) -> bool:
        return self.loaded.kind == "anyflow_far"

    @property
    def num_frames(self) -> int:
        # The frame count `anystep generate` picks when --num-frames is not given.
        if self.is_far:
            return int(sum(self.loaded.transformer.config.chunk_partition))
        return 7

    def toy_words(self) -> dict[str, list[str]] | None:
        """The toy world's words by role when this model's tokenizer is the toy one, else None."""
        from anystep.data import moving_digits as md

        vocab = set(self.loaded.pipe.tokenizer.get_vocab())
        if not set(md.vocabulary()) <= vocab:
            return None
        return {"colours": list(md.COLORS), "digits": list(md.DIGIT_WORDS), "directions": list(md.DIRECTIONS),
                "outside training": list(md.EXTRA_COLORS) + list(md.EXTRA_DIRECTIONS)}

    def command(self, prompt: str, steps: int, seed: int, image: bool = False) -> str:
        """The `anystep generate` line for this clip; with ``image``, FIRST_FRAME stands for the uploaded file."""
        parts = ["anystep", "generate", "--model", self.folder, "--prompt", prompt, "--steps", str(steps),
                 "--seed", str(seed)]
        if image:
            parts += ["--image", "FIRST_FRAME.png"]
        parts += ["--out", f"{self.name}-{steps}steps-seed{seed}.mp4"]
        return shlex.join(parts)

    def render(self, prompt, steps, seed) -> Clip:
        """The whole clip at ``steps`` steps."""
        return _last(self.render_chunks(prompt, steps, seed)).clip

    def render_chunks(self, prompt, steps, seed, image: str | None = None) -> Iterator[Chunk]:
        """A FAR model's clip chunk by chunk (the clip so far after each chunk; ``image``: its first
        frame). Other models give one chunk, the whole clip."""
        prompt, steps, seed = check_prompt(prompt), check_steps(steps), check_seed(seed)
        if image is not None and not self.is_far:
            raise StudioInputError(f"{self.name} is a {self.kind} model: image-to-video needs an AnyFlow-FAR model")
        with self.lock:
            context = _first_frame_latents(self.loaded, image) if image is not None else None
            folder = self._out_dir / f"{self.name}-{next(self._serial)}"
            folder.mkdir(parents=True)
            path = folder / f"{self.name}-{steps}steps-seed{seed}.mp4"
            command = self.command(prompt, steps, seed, image is not None)
            nfe = _nfe(self.loaded, steps)
            total = 0.0
            for k, count, seconds, video in _stream(self.loaded, prompt, steps, seed, self.num_frames, context):
                total += seconds
                _write_mp4(video, path)
                yield Chunk(k, count, seconds, Clip(path, total, nfe, steps, video.shape[0], command))


def _last(items):
    item = None
    for item in items:
        pass
    return item


def _stream(loaded, prompt: str, steps: int, seed: int, num_frames: int, context):
    """(chunk index, chunk count, seconds of this chunk, pixels so far (F, 3, H, W)) as each chunk
    is done. Sampling runs in a thread so that the page gets each chunk while the next one is made."""
    out: queue.Queue = queue.Queue()
    done = object()

    def work():
        start = time.perf_counter()

        def on_chunk(k, count, latents):
            nonlocal start
            video = _to_pixels(loaded, latents)
            out.put((k, count, time.perf_counter() - start, video))
            start = time.perf_counter()

        try:
            _clip_latents(loaded, prompt, steps, seed, num_frames, context, on_chunk)
            out.put(done)
        except BaseException as e:  # handed to the page's thread, which reports it
            out.put(e)

    thread = threading.Thread(target=work, daemon=True, name="anystep-studio-sample")
    thread.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # A page that went away stops reading, but sampling cannot be cut short: the model's lock
        # is held until it is really free.
        thread.join()


# --- the link to generation: the functions `anystep generate` calls, and nothing else ----------


def _clip_latents(loaded, prompt: str, steps: int, seed: int, num_frames: int, context,
                  on_chunk: Callable[[int, int, object], None]) -> None:
    """Sample one clip; ``on_chunk(k, count, latents_so_far)`` after each chunk (once, for a
    whole-clip model)."""
    count = len(loaded.transformer.config.chunk_partition) if loaded.kind == "anyflow_far" else 1
    if count > 1 or context is not None:
        generate_latents(loaded, [prompt], steps, seed=seed, num_frames=num_frames, height=HEIGHT, width=WIDTH,
                         context=context, on_chunk=lambda k, lat: on_chunk(k, count, lat))
        return
    on_chunk(0, 1, generate_latents(loaded, [prompt], steps, seed=seed, num_frames=num_frames, height=HEIGHT,
                                    width=WIDTH))


def _to_pixels(loaded, latents):
    return latents_to_video(loaded, latents)[0]


def _first_frame_latents(loaded, image: str):
    frames = read_frames(image)  # ConditioningError (a UserError) for a file that is not an image
    if frames.shape[0] != 1:
        raise StudioInputError(f"{Path(image).name} holds {frames.shape[0]} frames: give one still image")
    return context_latents(loaded, frames, HEIGHT, WIDTH)


def _nfe(loaded, steps: int) -> int:
    return nfe(loaded, steps)


def _write_mp4(video, path: Path) -> None:
    write_mp4(video, path, fps=FPS)


def open_models(folders) -> list[StudioModel]:
    """Load every folder (a ModelFolderError, one line, for one that is not a model)."""
    import atexit
    import shutil
    import tempfile

    from anystep.sampling import load_model

    loaded = [load_model(f) for f in folders]
    # The page's clips live as long as the server; the download button hands them out.
    out_dir = Path(tempfile.mkdtemp(prefix="anystep-studio-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    models = [StudioModel(m, out_dir) for m in loaded]
    names = [m.name for m in models]
    for m in models:  # two folders of one name get their parent's name too, to tell them apart
        if names.count(m.name) > 1:
            m.name = f"{Path(m.folder).parent.name}-{m.name}"
    return models
