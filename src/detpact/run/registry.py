"""The model registry: one SQLite database indexing the runs (and their evaluations and
exports) of one or more runs roots.

The database is an index, never the only copy: every row is computed from a run folder
(run/registry_index.py), so `detpact registry rebuild` recreates it. SQLite in WAL mode
with a busy timeout lets many processes record runs at once; every write is one
`BEGIN IMMEDIATE` transaction (taking the write lock up front, so that two writers never
deadlock upgrading a read lock). The schema version is SQLite's `user_version` pragma;
a database written by a newer detpact is refused with a clear error.

Only the standard library here (and the project's error type and atomic writes): a
registry query needs neither torch nor the config schema.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from detpact.errors import DetpactError
from detpact.run.atomic import atomic_open

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
METRIC_NAME = re.compile(r"[A-Za-z0-9_]+")
MODES = ("max", "min")

# (column, SQL type, JSON-encoded). A run row: one per run folder.
RUN_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("run_dir", "TEXT PRIMARY KEY", False),  # the run folder, absolute: run ids repeat across runs roots
    ("run_id", "TEXT NOT NULL", False),
    ("task", "TEXT", False),  # the config's top-level `task`
    ("status", "TEXT NOT NULL", False),  # finished | stopped | failed | export_failed | running
    ("end_reason", "TEXT", False),  # train_report.json's: steps_done, early_stop, signal, nonfinite_abort, ...
    ("config_hash", "TEXT", False),
    ("dataset_fingerprint", "TEXT", False),
    ("best_metric", "TEXT", False),  # train.checkpoint.best_metric, its mode, value and step (best.pt)
    ("best_mode", "TEXT", False),
    ("best_value", "REAL", False),
    ("best_step", "INTEGER", False),
    ("steps", "INTEGER", False),
    ("metrics", "TEXT NOT NULL", True),  # the validation that wrote best.pt: map50_95, map50, ...
    ("checkpoints", "TEXT NOT NULL", True),  # {"best": {"path", "sha256", "size"}, "last": {...}}
    ("versions", "TEXT NOT NULL", True),  # python, torch, detpact, numpy, onnx, ...
    ("git_sha", "TEXT", False),
    ("git_dirty", "INTEGER", False),
    ("started", "TEXT", False),  # run_meta.json's start_time and end_time (UTC, ISO 8601)
    ("ended", "TEXT", False),
)
# An evaluation (kind "eval", name best | last | onnx) or export (kind "export", name onnx) of a run.
RECORD_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("run_dir", "TEXT NOT NULL", False),
    ("kind", "TEXT NOT NULL", False),
    ("name", "TEXT NOT NULL", False),
    ("time", "TEXT", False),
    ("config_hash", "TEXT", False),
    ("dataset_fingerprint", "TEXT", False),
    ("path", "TEXT", False),  # the evaluated checkpoint or the exported model
    ("sha256", "TEXT", False),  # of the exported model
    ("metrics", "TEXT NOT NULL", True),
    ("details", "TEXT NOT NULL", True),  # eval: images, dataset; export: verdict, opset, exporter
)
SCHEMA = (
    f"CREATE TABLE runs ({', '.join(f'{name} {kind}' for name, kind, _ in RUN_COLUMNS)})",
    "CREATE INDEX runs_task ON runs (task)",
    "CREATE INDEX runs_config_hash ON runs (config_hash)",
    "CREATE INDEX runs_run_id ON runs (run_id)",
    f"CREATE TABLE records ({', '.join(f'{name} {kind}' for name, kind, _ in RECORD_COLUMNS)}, "
    "PRIMARY KEY (run_dir, kind, name))",
)


class Registry:
    """The registry database at `path` (created, with its folder, on first use).

    Rows are plain dicts keyed by the column names above, JSON columns decoded. Every
    method opens its own connection, so a Registry can be shared with forked processes.
    """

    def __init__(self, path: str | Path, timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.timeout_s = timeout_s

    # --- writing ---------------------------------------------------------------------

    def put_run(self, run: dict[str, Any], records: Iterable[dict[str, Any]] = ()) -> None:
        """Insert or replace a run's row and all its records, in one transaction."""
        with self._write() as db:
            _put(db, run, records)

    def replace_all(self, entries: Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]) -> int:
        """Make the registry hold exactly `entries` ((run, records) pairs), in one transaction."""
        count = 0
        with self._write() as db:
            db.execute("DELETE FROM records")
            db.execute("DELETE FROM runs")
            for run, records in entries:
                _put(db, run, records)
                count += 1
        return count

    def rebuild(self, entries: Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]) -> int:
        """Replace the database file by a new one holding `entries`, whatever the old file's
        state (missing, corrupt, newer). The new file is complete before it takes the old
        one's place; the old one is kept as `<name>.bak`. Run it while nothing records."""
        fresh = self.path.with_name(self.path.name + ".rebuild")
        for stale in _files_of(fresh):
            stale.unlink(missing_ok=True)
        count = Registry(fresh, self.timeout_s).replace_all(entries)
        try:
            if self.path.exists():
                os.replace(self.path, self.path.with_name(self.path.name + ".bak"))
            # A write-ahead log left beside the old file would be replayed into the new one.
            for stale in _files_of(self.path)[1:]:
                stale.unlink(missing_ok=True)
            os.replace(fresh, self.path)
        except OSError as exc:
            raise DetpactError(f"Cannot replace the registry {self.path} by the rebuilt {fresh}: {exc}. Check the "
                               "folder's permissions.") from None
        return count

    # --- reading ---------------------------------------------------------------------

    def runs(self, task: str | None = None, config_hash: str | None = None) -> list[dict[str, Any]]:
        """Runs, oldest first; `config_hash` may be a prefix (e.g. the 12 characters shown)."""
        where, params = [], []
        if task is not None:
            where.append("task = ?")
            params.append(task)
        if config_hash is not None:
            where.append("substr(config_hash, 1, ?) = ?")
            params += [len(config_hash), config_hash]
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._select(sql + " ORDER BY started, run_id, run_dir", params, RUN_COLUMNS)

    def run(self, key: str) -> dict[str, Any]:
        """The run with this run id or run folder; DetpactError when none or several match."""
        by_dir = str(Path(key).resolve()) if ("/" in key or Path(key).is_dir()) else None
        rows = self._select("SELECT * FROM runs WHERE run_id = ? OR run_dir = ? ORDER BY run_dir",
                            [key, by_dir], RUN_COLUMNS)
        if not rows:
            raise DetpactError(f"No run {key!r} in the registry {self.path}. See the runs it holds with "
                               "`detpact registry list`, or re-index the run folders with `detpact registry rebuild`.")
        if len(rows) > 1:
            folders = ", ".join(row["run_dir"] for row in rows)
            raise DetpactError(f"Run id {key!r} names several runs in the registry {self.path} ({folders}): pass "
                               "the run folder instead.")
        return rows[0]

    def records(self, run_dir: str) -> list[dict[str, Any]]:
        """A run's evaluation and export records."""
        return self._select("SELECT * FROM records WHERE run_dir = ? ORDER BY kind, name", [run_dir], RECORD_COLUMNS)

    def best(self, task: str, metric: str, mode: str = "max") -> dict[str, Any]:
        """The run of `task` whose recorded `metric` (of its best.pt validation) is the
        highest (`max`) or lowest (`min`); ties go to the earlier run."""
        if mode not in MODES:
            raise DetpactError(f"Unknown mode {mode!r}: choose max or min.")
        if not METRIC_NAME.fullmatch(metric):
            raise DetpactError(f"Invalid metric name {metric!r}: a key of the validation metrics, e.g. map50_95.")
        key = f'$."{metric}"'
        order = "DESC" if mode == "max" else "ASC"
        rows = self._select(
            "SELECT * FROM runs WHERE task = ? AND json_type(metrics, ?) IN ('real', 'integer') "
            f"ORDER BY json_extract(metrics, ?) {order}, started, run_id LIMIT 1", [task, key, key], RUN_COLUMNS)
        if rows:
            return rows[0]
        runs = self.runs(task=task)
        if not runs:
            tasks = sorted({row["task"] for row in self.runs() if row["task"]})
            raise DetpactError(f"No run of task {task!r} in the registry {self.path} (its tasks: "
                               f"{', '.join(tasks) or 'none'}).")
        known = sorted({k for row in runs for k, v in row["metrics"].items() if isinstance(v, (int, float))})
        raise DetpactError(f"No run of task {task!r} has a value for the metric {metric!r}. Metrics recorded: "
                           f"{', '.join(known) or 'none (no run has validated yet)'}.")

    def export_csv(self, path: str | Path) -> int:
        """Write every run row to a CSV file (JSON columns as JSON text); returns the row count."""
        rows = self.runs()
        with atomic_open(Path(path), "w") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([name for name, _, _ in RUN_COLUMNS])
            for row in rows:
                writer.writerow([_csv_cell(row[name], is_json) for name, _, is_json in RUN_COLUMNS])
        return len(rows)

    # --- the connection ----------------------------------------------------------------

    def _select(self, sql: str, params: Sequence[Any], columns: tuple[tuple[str, str, bool], ...]
                ) -> list[dict[str, Any]]:
        with self._read() as db:
            return [_decode(row, columns) for row in db.execute(sql, params).fetchall()]

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._errors(), contextlib.closing(self._connect()) as db:
            yield db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._errors(), contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        """A connection to a database at the current schema version (created if new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, each write states its own.
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            version = self._version(db)
            if version < SCHEMA_VERSION:
                self._create(db)
        except BaseException:
            db.close()
            raise
        return db

    def _version(self, db: sqlite3.Connection) -> int:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DetpactError(
                f"The registry {self.path} has schema version {version}, newer than this detpact reads "
                f"({SCHEMA_VERSION}): it was written by a newer detpact. Upgrade detpact, or use another registry "
                "(--registry PATH, $DETPACT_REGISTRY or registry.path).")
        return version

    def _create(self, db: sqlite3.Connection) -> None:
        """Create the tables of a new database; another process may be doing the same now."""
        _retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL"), self.timeout_s)
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._version(db) == 0:  # another process did not get there first
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite and file system errors as DetpactErrors naming the database and the fix."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise DetpactError(f"The registry {self.path} stayed locked by another process for "
                                   f"{self.timeout_s:.0f} s ({exc}). Try again when it is done.") from None
            raise DetpactError(f"The registry {self.path} cannot be used ({exc}): it may be corrupt or unwritable. "
                               "Rebuild it from the run folders with `detpact registry rebuild` (the old file is "
                               "kept as .bak), or point to another one (--registry PATH, $DETPACT_REGISTRY or "
                               "registry.path).") from None
        except OSError as exc:
            raise DetpactError(f"The registry {self.path} cannot be opened ({exc}). Check the path and its "
                               "folder's permissions, or point to another one.") from None


def _put(db: sqlite3.Connection, run: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
    names = [name for name, _, _ in RUN_COLUMNS]
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
               _encode(run, RUN_COLUMNS))
    db.execute("DELETE FROM records WHERE run_dir = ?", (run["run_dir"],))
    names = [name for name, _, _ in RECORD_COLUMNS]
    for record in records:
        db.execute(f"INSERT INTO records ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                   _encode({**record, "run_dir": run["run_dir"]}, RECORD_COLUMNS))


def _encode(row: dict[str, Any], columns: tuple[tuple[str, str, bool], ...]) -> list[Any]:
    unknown = set(row) - {name for name, _, _ in columns}
    if unknown:
        raise ValueError(f"not registry columns: {sorted(unknown)}")
    return [json.dumps(row.get(name) or {}, sort_keys=True) if is_json else row.get(name)
            for name, _, is_json in columns]


def _decode(row: sqlite3.Row, columns: tuple[tuple[str, str, bool], ...]) -> dict[str, Any]:
    decoded = {name: json.loads(row[name]) if is_json else row[name] for name, _, is_json in columns}
    if decoded.get("git_dirty") is not None:  # SQLite keeps booleans as 0 / 1
        decoded["git_dirty"] = bool(decoded["git_dirty"])
    return decoded


def _csv_cell(value: Any, is_json: bool) -> Any:
    if is_json:
        return json.dumps(value, sort_keys=True)
    return "" if value is None else repr(value) if isinstance(value, float) else value


def _files_of(path: Path) -> list[Path]:
    """A database file and the write-ahead log and shared-memory files SQLite keeps beside it."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _retry_locked(action, timeout_s: float) -> None:
    """Run `action`, retrying while SQLite reports the database locked: switching the
    journal mode of a new database can fail at once while another process creates it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
