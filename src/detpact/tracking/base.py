"""What every experiment tracker offers the training run, and the guard that keeps a
failing tracker from ever stopping it.

A tracker receives the lines the Recorder writes (one per optimizer step, one per
validation) and, at the end of the run, the run folder to upload from. `TrackerSet`
calls each tracker inside a guard: the first exception a tracker raises is logged as a
warning, recorded for train_report.json, and that tracker is dropped for the rest of
the run (a server that is down would otherwise cost a timeout at every step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from detpact.run.contract import RunDir

log = logging.getLogger(__name__)

# How a run ended, in MLflow's words (the other trackers only close their files).
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class Tracker(Protocol):
    name: str

    def log_step(self, step: int, record: Mapping[str, Any]) -> None:
        """One line of train_metrics.jsonl."""

    def log_validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line of val_metrics.jsonl."""

    def finish(self, run: RunDir, status: str) -> None:
        """Upload what the run left (reports, export) and close; status: FINISHED, FAILED or KILLED."""

    def describe(self) -> dict[str, Any]:
        """Where the tracker put the run (for train_report.json)."""


class TrackerSet:
    """The run's trackers, each call guarded. `errors` holds the failures of trackers that
    could not even start (name -> message)."""

    def __init__(self, trackers: list[Tracker], errors: Mapping[str, str] | None = None):
        self.live: list[Tracker] = list(trackers)
        self.names = [t.name for t in trackers] + [n for n in (errors or {}) if n not in {t.name for t in trackers}]
        self.details: dict[str, dict[str, Any]] = {t.name: {} for t in trackers}
        self.errors: dict[str, str] = dict(errors or {})

    def __bool__(self) -> bool:
        return bool(self.names)

    def log_step(self, step: int, record: Mapping[str, Any]) -> None:
        self._each("log_step", step, record)

    def log_validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._each("log_validation", step, metrics)

    def finish(self, run: RunDir, status: str) -> None:
        self._each("finish", run, status)  # a tracker whose upload fails keeps its details (_each)
        for tracker in list(self.live):
            self.details[tracker.name] = tracker.describe()
        self.live = []

    def report(self) -> dict[str, Any]:
        """{tracker: {"ok", "error", ...where it logged}} for train_report.json's `tracking`."""
        return {name: {"ok": name not in self.errors, "error": self.errors.get(name), **self.details.get(name, {})}
                for name in self.names}

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.live):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # any tracker failure is reported, never fatal
                self.fail(tracker.name, f"{method}: {one_line(exc)}")
                self.live.remove(tracker)
                with contextlib.suppress(Exception):  # where it logged until then (its run id), for the report
                    self.details[tracker.name] = tracker.describe()

    def fail(self, name: str, message: str) -> None:
        log.warning("%s tracking failed (%s); training goes on without it", name, message)
        self.errors.setdefault(name, message)


NO_TRACKER = TrackerSet([])


def scalars(record: Mapping[str, Any], prefix: str, depth: int = 2) -> Iterator[tuple[str, float]]:
    """The finite numbers of a metrics line as (`prefix/key`, value); nested mappings
    (per_class, operating_point) become `prefix/key/sub` down to `depth` levels. Booleans,
    strings, None and lists are left out."""
    for key, value in record.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping) and depth > 1:
            yield from scalars(value, name, depth - 1)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__


_USERINFO = re.compile(r"^[^@]*@")


def redact_uri(uri: str | None) -> str | None:
    """`uri` without the user and password it may carry (they must not land in reports)."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=_USERINFO.sub("***@", parts.netloc)))
