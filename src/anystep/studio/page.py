"""The studio page (Gradio): one clip, the step comparison, and FAR image-to-video.

Every handler turns a bad input into one line in the page's message box: a ``UserError`` says
what to change; anything else is a bug, logged with its traceback on the server's terminal and
shown in the page as one line, never as a stack trace.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from anystep.errors import UserError
from anystep.studio.engine import COMPARE_STEPS, FPS, MAX_STEPS, StudioModel

log = logging.getLogger("anystep.studio")

# System fonts only: Gradio's default theme fetches its fonts from a web font service, and the
# page must work with no network.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
# Toy clips are 32x32: shown large, with sharp pixels rather than a blur.
CSS = ("#message p { color: #b42318; font-weight: 600; } .clip video { image-rendering: pixelated; }"
       " #i2v-image img { width: 128px !important; height: 128px !important; object-fit: contain !important;"
       " image-rendering: pixelated; }")
VIDEO_PX = 256


def _fail(e: BaseException) -> str:
    if isinstance(e, UserError):
        text = str(e).strip().splitlines()
        return f"Cannot generate: {text[0] if text else type(e).__name__}"
    log.exception("studio request failed")
    return f"Internal error ({type(e).__name__}); the server's terminal has the details"


def _steps(n: int) -> str:
    return f"{n} step{'s' * (n != 1)}"


def _stats(clip, chunks: list | None = None) -> str:
    head = (f"**{clip.seconds:.2f} s** wall time · NFE {clip.nfe} · {_steps(clip.steps)}"
            f" · {clip.frames} frames at {FPS} fps")
    if not chunks:
        return head
    lines = [f"chunk {c.index + 1}/{c.count}: {c.seconds:.2f} s" for c in chunks]
    return head + "\n\n" + "  \n".join(lines)


def _vocabulary_note(models: list[StudioModel]) -> str:
    words = next((w for w in (m.toy_words() for m in models) if w), None)
    if words is None:
        return ""
    parts = [f"{role}: {' '.join(ws)}" for role, ws in words.items()]
    return ("Toy world prompts read **a COLOUR DIGIT moving DIRECTION**; " + " · ".join(parts))


class Studio:
    def __init__(self, models: list[StudioModel]):
        self.models = {m.name: m for m in models}
        self.toy = any(m.toy_words() for m in models)

    def _model(self, name) -> StudioModel:
        if name not in self.models:
            raise UserError(f"no model named {name!r} is loaded")
        return self.models[name]

    # --- handlers (generators: the page updates as results arrive) ---

    def generate(self, name, prompt, seed, steps, image=None):
        """(message, video, stats, download, command) after every chunk."""
        try:
            model = self._model(name)
            if model.lock.locked():
                yield (f"Waiting: {model.name} is busy with another request; yours runs next",
                       gr.update(), gr.update(), gr.update(), gr.update())
            chunks = []
            for chunk in model.render_chunks(prompt, steps, seed, image=image):
                chunks.append(chunk)
                clip = chunk.clip
                yield ("", gr.update(value=str(clip.path)), _stats(clip, chunks if model.is_far else None),
                       gr.update(value=str(clip.path), visible=True), clip.command)
        except Exception as e:
            yield _fail(e), None, "", gr.update(value=None, visible=False), ""

    def compare(self, prompt, seed):
        """(message, one video per model and step count) as each cell is done; a cell's label
        gives its wall time and NFE."""
        cells = [(m, s) for m in self.models.values() for s in COMPARE_STEPS]
        outs = [gr.update() for _ in cells]
        try:
            for i, (model, steps) in enumerate(cells):
                clip = model.render(prompt, steps, seed)
                outs[i] = gr.update(value=str(clip.path), label=f"{_steps(steps)} · {clip.seconds:.2f} s · NFE {clip.nfe}")
                yield ("", *outs)
        except Exception as e:
            yield (_fail(e), *outs)

    # --- layout ---

    def build(self) -> gr.Blocks:
        names = list(self.models)
        far = [n for n in names if self.models[n].is_far]
        example = "a red three moving left" if self.toy else ""
        with gr.Blocks(title="anystep studio", analytics_enabled=False) as page:
            gr.Markdown("# anystep studio\nOne model, any number of steps: "
                        + ", ".join(f"`{n}` ({self.models[n].kind})" for n in names))
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=example, elem_id="prompt", scale=3)
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=1)
            if self.toy:
                gr.Markdown(_vocabulary_note(list(self.models.values())), elem_id="vocabulary")
                gr.Examples([["a red three moving left"], ["a green seven moving up"], ["a blue zero moving right"],
                             ["a yellow five moving down"]], inputs=[prompt], label="Toy prompts")
            message = gr.Markdown("", elem_id="message")
            with gr.Tabs():
                with gr.Tab("Generate", id="tab-generate"):
                    self._generate_tab(names, prompt, seed, message)
                with gr.Tab("Compare steps", id="tab-compare"):
                    self._compare_tab(prompt, seed, message)
                if far:
                    with gr.Tab("Image to video (FAR)", id="tab-i2v"):
                        self._generate_tab(far, prompt, seed, message, i2v=True)
        return page

    def _generate_tab(self, names, prompt, seed, message, i2v: bool = False):
        p = "i2v-" if i2v else ""
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=names[0], label="Model", elem_id=f"{p}model")
                steps = gr.Slider(1, MAX_STEPS, value=4, step=1, label="Steps", elem_id=f"{p}steps")
                image = None
                if i2v:
                    image = gr.Image(type="filepath", format="png", image_mode=None, sources=["upload"],
                                     label="First frame (32x32)", height=160, elem_id="i2v-image")
                button = gr.Button("Generate", variant="primary", elem_id=f"{p}generate")
            with gr.Column(scale=1):
                video = gr.Video(label="Clip", autoplay=True, loop=True, height=VIDEO_PX, interactive=False,
                                 elem_id=f"{p}video", elem_classes=["clip"])
                stats = gr.Markdown("", elem_id=f"{p}stats")
                download = gr.DownloadButton("Download mp4", visible=False, elem_id=f"{p}download")
                command = gr.Textbox(label="Reproduce with", interactive=False, buttons=["copy"], elem_id=f"{p}command")
        inputs = [model, prompt, seed, steps] + ([image] if i2v else [])
        fn = self.generate if not i2v else self._generate_i2v
        # Handlers run side by side; each model's lock queues the requests that share it.
        button.click(fn, inputs, [message, video, stats, download, command], concurrency_limit=None)

    def _generate_i2v(self, name, prompt, seed, steps, image):
        if image is None:
            yield ("Cannot generate: upload a first frame (a 32x32 image) for image-to-video",
                   None, "", gr.update(visible=False), "")
            return
        yield from self.generate(name, prompt, seed, steps, image=image)

    def _compare_tab(self, prompt, seed, message):
        button = gr.Button(f"Compare steps ({' / '.join(map(str, COMPARE_STEPS))})", variant="primary",
                           elem_id="compare")
        videos = []
        for m in self.models.values():
            gr.Markdown(f"**{m.name}** ({m.kind})")
            with gr.Row():
                for s in COMPARE_STEPS:
                    videos.append(gr.Video(label=_steps(s), autoplay=True, loop=True, height=160, interactive=False,
                                           elem_id=f"compare-{m.name}-{s}", elem_classes=["clip"], min_width=120))
        button.click(self.compare, [prompt, seed], [message, *videos], concurrency_limit=None)


def serve(models: list[StudioModel], host: str, port: int) -> None:
    """Build the page and serve it until Ctrl-C."""
    page = Studio(models).build()
    page.queue(default_concurrency_limit=None)
    print(f"anystep studio: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True, theme=THEME, css=CSS,
                footer_links=[], ssr_mode=False, pwa=False, mcp_server=False, show_error=False)
