"""Graceful stop: SIGINT/SIGTERM during training end the run at the next step boundary.

Pre-emptible machines send SIGTERM shortly before they go away. Instead of dying
mid-step, the loop finishes the step it is in, writes `last.pt` and raises
`TrainingStopped`, whose message says how to resume. A second signal stops at once
(KeyboardInterrupt); the last checkpoint stays in place either way.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the signal handler; read by the loop at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the returned request instead of killing the
    process. Outside the main thread (where Python cannot handle signals) this does nothing."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        if request.requested:
            raise KeyboardInterrupt  # asked twice: stop now
        request.signum = signum
        log.warning("received %s: stopping after the current step and saving checkpoints/last.pt "
                    "(send it again to stop at once)", request.signal_name)

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
