"""The one console for people: log lines and the progress bar share it (stderr), so
log lines print above the live bar instead of tearing it."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

CONSOLE = Console(stderr=True)


def setup_logging(debug: bool = False) -> None:
    handler = RichHandler(console=CONSOLE, show_path=debug, show_time=False, markup=False, rich_tracebacks=False)
    # Third-party libraries (onnxscript's optimiser, torch.onnx) log at INFO; only
    # detpact's own progress belongs on the user's screen.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("detpact").setLevel(logging.DEBUG if debug else logging.INFO)
