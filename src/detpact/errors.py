"""The one project error type for user mistakes.

A `DetpactError` carries a message written for a person: what is wrong, in which
file, and how to fix it. The CLI prints it without a traceback and exits with
`exit_code` (2 for bad input). Internal bugs raise ordinary exceptions.
"""

from __future__ import annotations


class DetpactError(Exception):
    """A user-facing error: bad config, missing data, corrupt checkpoint, ..."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TrainingAborted(DetpactError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row).

    Not bad input, so it gets its own exit status; the last good checkpoint and the
    metrics written so far stay in place.
    """

    exit_code = 3

    def __init__(self, message: str, reason: str = "aborted"):
        super().__init__(message)
        self.reason = reason  # the run's end_reason: "nonfinite_abort", "disk_full", "aborted"


class TrainingStopped(DetpactError):
    """Training stopped on a signal (SIGINT/SIGTERM) after saving its full state.

    Exits with 128 + the signal number, as a shell does for a process the signal ended.
    """

    def __init__(self, message: str, signum: int, run_id: str):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.run_id = run_id


class CheckFailed(DetpactError):
    """A check the user asked for ran and failed (e.g. ONNX parity under policy 'fail')."""

    exit_code = 1
