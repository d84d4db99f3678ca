"""Tracking end to end, against real parts: a real `mlflow server` (sqlite backend store,
local artifact folder) on 127.0.0.1, a tiny run logging to it over HTTP read back through
MLflow's own client, its TensorBoard event files read back with tensorboard's reader, a
second run whose tracking server is unreachable, a third whose server starts answering
HTTP 500 once the run is under way (a proxy in front of the real one), and a missing extra.

To stay within its time budget the module starts the unreachable run and the
missing-extra process in the background while the server boots, the failing-server run
in the background once it is up, then trains the tracked run, then collects them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_env, train_tiny_run, write_tiny_config
from detpact.config import load_config
from detpact.tracking.session import flat_params

pytestmark = pytest.mark.slow

EXPERIMENT, MODEL_NAME = "tiny-tracking", "tiny-detector"


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=(root / "server.log").open("wb"), stderr=subprocess.STDOUT,
        # its own process group: the server's uvicorn workers go down with it (stop_server)
        start_new_session=True,
        # no background job runner (7 more processes, for features detpact does not use)
        env={**quiet_mlflow_env(), "PYTHONUNBUFFERED": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return server, uri
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """The server and every process it started (its group); nothing it holds needs a clean stop."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


class FailingMidRun(BaseHTTPRequestHandler):
    """Forwards MLflow's requests to the real server until the run logs its first metrics;
    from then on every request is answered HTTP 500 (a server failing mid-run)."""

    upstream = ""
    failing = False
    failed_requests = 0

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        if self.path.endswith("/runs/log-batch") and json.loads(body or b"{}").get("metrics"):
            cls.failing = True
        if cls.failing:
            cls.failed_requests += 1
            self._reply(500, b'{"error_code": "INTERNAL_ERROR", "message": "injected failure"}', "application/json")
            return
        request = urllib.request.Request(cls.upstream + self.path, data=body or None, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self._reply(response.status, response.read(), response.headers.get("Content-Type"))
        except urllib.error.HTTPError as error:
            self._reply(error.code, error.read(), error.headers.get("Content-Type"))

    def _reply(self, status: int, payload: bytes, content_type: str | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args) -> None:  # no access log on the test's stderr
        pass


def failing_proxy(upstream: str) -> tuple[ThreadingHTTPServer, str]:
    FailingMidRun.upstream = upstream
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), FailingMidRun)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy, f"http://127.0.0.1:{proxy.server_address[1]}"


def background(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A detpact CLI process whose output goes to files (a pipe nobody reads could fill and block it)."""
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=(cwd / "stdout.txt").open("w"),
                            stderr=(cwd / "stderr.txt").open("w"), text=True)


def finished(process: subprocess.Popen, cwd: Path, timeout: float) -> tuple[int, str]:
    return process.wait(timeout=timeout), (cwd / "stderr.txt").read_text()


def quiet_mlflow_env(base: dict[str, str] | None = None) -> dict[str, str]:
    return {**(base or os.environ), "MLFLOW_DISABLE_TELEMETRY": "true"}


def tracking_sets(uri: str) -> list[str]:
    return ["--set", f"logging.mlflow.tracking_uri={uri}", "--set", f"logging.mlflow.experiment={EXPERIMENT}"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("tracking")
    # 1. In the background: a run whose tracking server is down, and a train command with
    #    mlflow unimportable. The port is bound and never listens: connections to it are
    #    refused, and no other process can take it meanwhile.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down = root / "down"
    down.mkdir()
    down_env = quiet_mlflow_env(make_env(down / "runs", cache_dir))
    unreachable = background(
        [sys.executable, "-m", "detpact", "train", str(write_tiny_config(down / "tiny.yaml")), "--run-id", "down",
         *tracking_sets(closed_uri), "--set", "train.epochs=1"], down_env, down)
    missing = root / "missing"
    missing.mkdir()
    no_extra = background(
        [sys.executable, "-c", "import runpy, sys; sys.modules['mlflow'] = None; "
         "runpy.run_module('detpact', run_name='__main__')", "train", str(write_tiny_config(missing / "tiny.yaml")),
         "--run-id", "nox", *tracking_sets(closed_uri)],
        quiet_mlflow_env(make_env(missing / "runs", cache_dir)), missing)
    server = proxy = flaky = None
    try:
        # 2. The server; in the background a run logging through a proxy that fails it
        #    mid-run; the tracked run (TensorBoard too, export on, best.pt registered).
        server, uri = start_mlflow_server(root)
        proxy, proxy_uri = failing_proxy(uri)
        failing = root / "failing"
        failing.mkdir()
        flaky = background(
            [sys.executable, "-m", "detpact", "train", str(write_tiny_config(failing / "tiny.yaml")), "--run-id",
             "flaky", *tracking_sets(proxy_uri), "--set", "train.epochs=1"],
            quiet_mlflow_env(make_env(failing / "runs", cache_dir)), failing)
        _, run, _ = train_tiny_run(root, cache_dir, *tracking_sets(uri), "--set", "logging.tensorboard=true",
                                   "--set", f"logging.mlflow.register_model={MODEL_NAME}",
                                   "--set", "export.onnx=true", "--set", "export.exporter=torchscript",
                                   "--set", "export.parity_map=false")
        report = json.loads((run / "reports" / "train_report.json").read_text())
        yield SimpleNamespace(
            root=root, run=run, uri=uri, client=MlflowClient(uri), report=report,
            mlflow_run_id=report["tracking"]["mlflow"]["run_id"],
            unreachable=finished(unreachable, down, 300), closed_uri=closed_uri,
            down_run=down / "runs" / "down", no_extra=finished(no_extra, missing, 120),
            missing_runs=missing / "runs", failing=finished(flaky, failing, 300),
            failing_run=failing / "runs" / "flaky")
    finally:
        for process in (unreachable, no_extra, flaky):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if proxy is not None:
            proxy.shutdown()
        if server is not None:
            stop_server(server)
        closed.close()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_params_and_tags_read_back_from_the_server(tracked):
    mlrun = tracked.client.get_run(tracked.mlflow_run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tiny"
    assert tracked.client.get_experiment(mlrun.info.experiment_id).name == EXPERIMENT
    expected = flat_params(load_config(tracked.run / "reports" / "config_resolved.yaml"))
    assert mlrun.data.params == expected and mlrun.data.params["train.epochs"] == "2"
    meta = json.loads((tracked.run / "reports" / "run_meta.json").read_text())
    assert meta["git_sha"], "the tests run from a git checkout"
    tags = mlrun.data.tags
    assert tags["detpact.config_hash"] == meta["config_hash"]
    assert tags["detpact.dataset_fingerprint"] == meta["dataset_fingerprint"]
    assert tags["detpact.git_sha"] == tags["mlflow.source.git.commit"] == meta["git_sha"]
    assert tags["detpact.run_id"] == "tiny" and tags["detpact.task"] == "shapes"


def test_metric_history_has_one_value_per_step_and_per_validation(tracked):
    client, run_id = tracked.client, tracked.mlflow_run_id
    steps = jsonl(tracked.run / "reports" / "train_metrics.jsonl")
    validations = jsonl(tracked.run / "reports" / "val_metrics.jsonl")
    assert len(steps) == 6 and len(validations) == 2
    for field in ("loss", "lr", "grad_norm", "loss_cls"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"train/{field}"))
        assert history == [(line["step"], line[field]) for line in steps], field  # float64 both: exact
    for field in ("map50_95", "map50"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"val/{field}"))
        assert history == [(line["step"], line[field]) for line in validations], field
    assert [m.step for m in client.get_metric_history(run_id, "val/per_class/circle")] == [3, 6]


def test_artifacts_are_the_reports_and_the_exported_model(tracked):
    client, run_id, run = tracked.client, tracked.mlflow_run_id, tracked.run
    reports = {Path(a.path).name for a in client.list_artifacts(run_id, "reports")}
    assert {"train_metrics.jsonl", "val_metrics.jsonl", "config_resolved.yaml", "run_meta.json",
            "train_report.json", "onnx_parity.json"} <= reports
    exports = {Path(a.path).name for a in client.list_artifacts(run_id, "exports")}
    assert {"model.onnx", "model.onnx.meta.json"} <= exports
    fetched = Path(client.download_artifacts(run_id, "exports/model.onnx", str(tracked.root / "fetched")))
    assert sha256(fetched) == sha256(run / "exports" / "model.onnx")


def test_the_best_checkpoint_is_registered_as_a_model_version(tracked):
    registered = tracked.report["tracking"]["mlflow"]["registered_model"]
    version = tracked.client.get_model_version(MODEL_NAME, registered["version"])
    assert version.run_id == tracked.mlflow_run_id and version.status == "READY"
    source = Path(tracked.client.download_artifacts(tracked.mlflow_run_id, "best_checkpoint/best.pt",
                                                    str(tracked.root / "registered")))
    assert sha256(source) == sha256(tracked.run / "checkpoints" / "best.pt")


def test_train_report_records_the_trackers_and_the_manifest_still_holds(tracked):
    tracking = tracked.report["tracking"]
    assert tracking["mlflow"]["ok"] and tracking["tensorboard"]["ok"] and tracking["mlflow"]["error"] is None
    manifest = json.loads((tracked.run / "manifest.json").read_text())["files"]
    assert manifest["reports/train_report.json"]["sha256"] == sha256(tracked.run / "reports" / "train_report.json")


def test_tensorboard_event_files_hold_the_metrics_of_every_step(tracked):
    events = EventAccumulator(str(tracked.run / "tensorboard")).Reload()
    steps = jsonl(tracked.run / "reports" / "train_metrics.jsonl")
    validations = jsonl(tracked.run / "reports" / "val_metrics.jsonl")
    for field in ("loss", "lr", "grad_norm"):  # TensorBoard keeps float32 values
        scalars = events.Scalars(f"train/{field}")
        assert [e.step for e in scalars] == [line["step"] for line in steps], field
        assert [e.value for e in scalars] == pytest.approx([line[field] for line in steps], rel=1e-6), field
    scalars = events.Scalars("val/map50")
    assert [e.step for e in scalars] == [line["step"] for line in validations]
    assert [e.value for e in scalars] == pytest.approx([line["map50"] for line in validations], rel=1e-6)


def test_an_unreachable_tracking_server_does_not_stop_the_run(tracked):
    returncode, stderr = tracked.unreachable
    assert returncode == 0, stderr
    run = tracked.down_run
    assert json.loads((run / "status.json").read_text())["phase"] == "done"
    assert (run / "checkpoints" / "best.pt").is_file()
    error = json.loads((run / "reports" / "train_report.json").read_text())["tracking"]["mlflow"]
    assert error["ok"] is False and tracked.closed_uri in error["error"] and "Connection refused" in error["error"]
    assert "mlflow tracking failed" in stderr and "Traceback" not in stderr


def test_a_server_failing_mid_run_is_reported_once_and_the_run_finishes(tracked):
    returncode, stderr = tracked.failing
    assert returncode == 0, stderr
    run = tracked.failing_run
    assert json.loads((run / "status.json").read_text())["phase"] == "done"
    assert len(jsonl(run / "reports" / "train_metrics.jsonl")) == 3  # every step trained and logged locally
    error = json.loads((run / "reports" / "train_report.json").read_text())["tracking"]["mlflow"]
    assert error["ok"] is False and "500" in error["error"] and error["run_id"]  # the run was opened before
    assert stderr.count("mlflow tracking failed") == 1 and "Traceback" not in stderr
    # Dropped at its first failure: MLflow's one retry, then no request at later steps or at the end.
    assert FailingMidRun.failed_requests <= 2


def test_a_missing_extra_stops_before_training_with_the_install_command(tracked):
    returncode, stderr = tracked.no_extra
    assert returncode == 2, stderr
    assert "logging.mlflow is on, but mlflow is not installed" in stderr
    assert "pip install 'detpact[tracking]'" in stderr and "Traceback" not in stderr
    assert not (tracked.missing_runs / "nox").exists()
