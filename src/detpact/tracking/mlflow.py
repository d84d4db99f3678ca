"""An MLflow run per detpact run (`logging.mlflow`), through MLflow's own client.

params: the resolved config, flattened to dotted keys; metrics: `train/<field>` per
optimizer step and `val/<metric>` per validation (the step is the optimizer step);
tags: config hash, dataset fingerprint, git SHA, run id and folder; artifacts, at the
end: reports/ and, when export ran, exports/; when `register_model` names a model, a
successful run's checkpoints/best.pt becomes a new version of it in the model registry.

Step metrics are sent in batches (every FLUSH_EVERY_S seconds, at each validation and
at the end), so a slow server costs the training loop little. A resumed run continues
the MLflow run of its first session (found by the run folder's tag).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from detpact.config.outputs import MlflowConfig
from detpact.run.contract import RunDir
from detpact.tracking.base import FINISHED, redact_uri, scalars

FLUSH_EVERY_S = 10.0
MAX_METRICS_PER_BATCH = 1000  # MLflow's limits for one log_batch request
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000  # MLflow 3 refuses longer param values
RUN_DIR_TAG = "detpact.run_dir"


def configure_http(cfg: MlflowConfig) -> None:
    """MLflow's HTTP client reads its timeout and retries from the environment (its default
    of 7 retries with backoff waits minutes for a server that is down)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(cfg.timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run: RunDir, params: Mapping[str, str], tags: Mapping[str, str]):
        configure_http(cfg)
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.client = MlflowClient(cfg.tracking_uri)
        self.experiment_id = self._experiment_id(cfg.experiment)
        self.resumed = False
        self.run_id = self._open_run(run, tags)
        self.pending: list[Any] = []
        self.flushed_at = time.monotonic()
        self.registered: dict[str, Any] | None = None
        self.changed_params = self._log_params(params)

    def log_step(self, step: int, record: Mapping[str, Any]) -> None:
        self._queue(scalars({k: v for k, v in record.items() if k != "step"}, "train"), step)
        if len(self.pending) >= MAX_METRICS_PER_BATCH or time.monotonic() - self.flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def log_validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._queue(scalars({k: v for k, v in metrics.items() if k != "step"}, "val"), step)
        self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start:start + MAX_METRICS_PER_BATCH])
        self.flushed_at = time.monotonic()

    def finish(self, run: RunDir, status: str) -> None:
        try:
            self.flush()
            self.client.log_artifacts(self.run_id, str(run.reports), "reports")
            if run.onnx_model.is_file():
                self.client.log_artifacts(self.run_id, str(run.exports), "exports")
            if self.cfg.register_model and status == FINISHED and run.best_ckpt.is_file():
                self._register_best(run)
        finally:  # the MLflow run is closed even when an upload failed
            self.client.set_terminated(self.run_id, status)

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": redact_uri(self.client.tracking_uri), "experiment": self.cfg.experiment,
                "experiment_id": self.experiment_id, "run_id": self.run_id, "resumed": self.resumed,
                "registered_model": self.registered,
                **({"params_not_updated": self.changed_params} if self.changed_params else {})}

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self.client.create_experiment(name)

    def _open_run(self, run: RunDir, tags: Mapping[str, str]) -> str:
        """The MLflow run of an earlier session of this run folder, reopened, else a new one."""
        folder = str(run.root.resolve())
        if "'" not in folder:  # the filter language has no escape for quotes: such a folder starts anew
            found = self.client.search_runs([self.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{folder}'",
                                            max_results=1)
            if found:
                self.resumed = True
                self.client.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id
        created = self.client.create_run(self.experiment_id, tags={**tags, RUN_DIR_TAG: folder},
                                         run_name=run.root.name)
        return created.info.run_id

    def _log_params(self, params: Mapping[str, str]) -> list[str]:
        """Log the params the MLflow run does not have yet; returns the keys it holds with
        another value (a resume with --allow-drift: MLflow params cannot change)."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params if self.resumed else {}
        values = {key: value[:MAX_PARAM_LENGTH] for key, value in params.items()}
        new = [Param(key, value) for key, value in values.items() if key not in held]
        for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + MAX_PARAMS_PER_BATCH])
        return sorted(key for key, value in values.items() if key in held and held[key] != value)

    def _queue(self, values: Any, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(_metric_key(key), value, now, step) for key, value in values]

    def _register_best(self, run: RunDir) -> None:
        from mlflow.exceptions import MlflowException

        self.client.log_artifact(self.run_id, str(run.best_ckpt), "best_checkpoint")
        name = self.cfg.register_model
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, f"runs:/{self.run_id}/best_checkpoint", run_id=self.run_id,
                                                   tags={"detpact.run_id": run.root.name})
        self.registered = {"name": name, "version": version.version, "source": version.source}


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, '_', '-', '.', ' ', ':' and '/' (class names may hold more)."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
