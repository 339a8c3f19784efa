"""``anystep studio``: a web page to feel any-step generation (the ``anystep[studio]`` extra).

:mod:`anystep.studio.engine` checks the page's inputs and renders clips through the toolkit's own
generation functions; :mod:`anystep.studio.page` is the Gradio page around it. Gradio is imported
only here and there, never by ``import anystep``.
"""

from __future__ import annotations

import importlib.util
import os

from anystep.errors import UserError

INSTALL_HINT = "pip install 'anystep[studio]'"


def run(folders: list[str], host: str = "127.0.0.1", port: int = 7860) -> int:
    """Load every model folder, then serve the page until Ctrl-C. Bad folders and a missing extra
    are one-line UserErrors, raised before anything is served."""
    from anystep.models.folders import read_model_index
    from anystep.studio.engine import open_models

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    for folder in folders:  # a folder that is not a model is named before anything else is said
        read_model_index(folder)
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"anystep studio needs the studio extra (Gradio): {INSTALL_HINT}")
    models = open_models(folders)
    # No usage reports, no version check: the page talks to this machine only.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from anystep.studio.page import serve

    serve(models, host, port)
    return 0
