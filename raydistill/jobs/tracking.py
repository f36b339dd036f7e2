"""MLflow tracking (``tracking.mlflow``), through MLflow's own client.

One MLflow run per run directory and spec. The driver starts it before any stage runs (and checks
the store there, once: a server that cannot be reached stops the run before any work, never in the
middle of training), logs the flattened spec as params and keeps the run's id in ``RUN/mlflow.json``,
so that a re-run with the same spec continues the same MLflow run. MLflow's params cannot change,
so a re-run with another spec starts a new MLflow run; stages it skips then replay their earlier
outputs into it (the table of stages says what each one logs: ``Stage.track``).

The train workers' rank 0 logs every step's metrics as it goes; the driver logs the eval metrics,
the report with its plots, the spec and where the student is. Once the run has started, a failure
to log is a warning: tracking never costs the training or the evaluation it records.

Ray's ``setup_mlflow`` starts an MLflow run inside the training function; this run spans every
stage and is started by the driver, so the workers are handed its id instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from raydistill.fileio import write_atomic
from raydistill.jobs.rundir import RunDir
from raydistill.spec import JobSpec, MLflowSpec, redact

# MLflow's limits (mlflow.utils.validation): params and tags per log_batch call, metrics per call, a param's length.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAM_VALUE_MAX = 6000
KEY_MAX = 250
# What MLflow accepts in a param or metric name.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
TAG_STUDENT = "raydistill.student"
TAG_RUN_DIR = "raydistill.run_dir"


class TrackingError(RuntimeError):
    """The tracking store cannot be used: raised when the run starts, before any stage runs."""


# --------------------------------------------------------------------------- pure helpers


def store_uri(mlflow: MLflowSpec, run: RunDir) -> str:
    """The tracking URI: the spec's, or a local store in ``RUN/mlruns`` (absolute, so that train workers find it)."""
    return mlflow.tracking_uri or run.mlruns.resolve().as_uri()


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)[:KEY_MAX]


def flatten_params(raw: dict) -> dict[str, str]:
    """A dumped spec as MLflow params: one dotted key per leaf, values as text cut to MLflow's length limit.

    Lists of sections (``teachers``) are flattened by index; other lists, unset values and empty
    sections are kept whole, as JSON, so that every key of the spec is there to compare runs by.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            for i, x in enumerate(node):
                walk(f"{prefix}.{i}", x)
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            out[_key(prefix)] = text[:PARAM_VALUE_MAX]

    walk("", raw)
    return out


def batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``size``: MLflow's log_batch takes at most so many of each kind."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def numeric_leaves(node: Any, prefix: str = "") -> dict[str, float]:
    """The numbers in a nested report (a dict of dicts), under dotted keys; text, flags, lists and unset values are left out."""
    out: dict[str, float] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
        out[_key(prefix)] = float(node)
    return out


def step_metrics(record: dict, prefix: str = "train/") -> dict[str, float]:
    """One training step's record (``MetricsLog``) as metrics: its numbers but the step itself."""
    return {f"{prefix}{k}": v for k, v in numeric_leaves({k: v for k, v in record.items() if k != "step"}).items()}


# --------------------------------------------------------------------------- the client


@lru_cache(maxsize=8)
def client(tracking_uri: str):
    """MLflow's client for ``tracking_uri``, in any process (the driver, a train worker, a test); one per store and process."""
    if tracking_uri.startswith("file:"):
        # MLflow 3 keeps its file store but refuses it unless asked; the run's local store needs no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def _fail_fast() -> Iterator[None]:
    """The start check: an unreachable server fails in seconds, not after MLflow's minutes of retries. A user's own settings win."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    added = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run that this run directory logs to; plain data, so that it travels to the train workers."""

    tracking_uri: str
    run_id: str
    new: bool = False  # started by this ``raydistill run``: stages it skips replay their outputs into it

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        c = client(self.tracking_uri)
        for chunk in batches([Metric(k, v, ts, step) for k, v in metrics.items()], METRICS_PER_BATCH):
            c.log_batch(self.run_id, metrics=chunk)

    def log_history(self, records: Iterable[dict], prefix: str = "train/") -> int:
        """Training steps recorded earlier (``RUN/train/metrics.jsonl``), each at its own step; returns how many."""
        from mlflow.entities import Metric

        ts, metrics, n = _now_ms(), [], 0
        for r in records:
            if "step" in r:
                metrics += [Metric(k, v, ts, int(r["step"])) for k, v in step_metrics(r, prefix).items()]
                n += 1
        c = client(self.tracking_uri)
        for chunk in batches(metrics, METRICS_PER_BATCH):
            c.log_batch(self.run_id, metrics=chunk)
        return n

    def log_eval(self, run: RunDir) -> None:
        """The report's numbers as ``eval/...`` metrics, and RUN/eval (report.md, report.json, plots) as artifacts."""
        report = run.eval / "report.json"
        if not report.exists():
            return
        self.log_metrics(numeric_leaves(json.loads(report.read_text()), "eval"))
        client(self.tracking_uri).log_artifacts(self.run_id, str(run.eval), artifact_path="eval")

    def set_student(self, student_dir: Path) -> None:
        """Where the trained student is (a tag: MLflow's params are the spec's)."""
        client(self.tracking_uri).set_tag(self.run_id, TAG_STUDENT, str(Path(student_dir).resolve()))

    def finish(self, status: str) -> None:
        client(self.tracking_uri).set_terminated(self.run_id, status)


def warn(what: str, err: BaseException) -> None:
    """A logging failure once the run has started: said, and left at that."""
    print(f"warning: MLflow: could not log {what}: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the driver


def start(spec: JobSpec, run: RunDir) -> TrackedRun:
    """Start or continue this run directory's MLflow run; raises ``TrackingError`` if the store cannot be used."""
    cfg = spec.tracking.mlflow
    assert cfg is not None, "start() is only called with tracking.mlflow set"
    uri = store_uri(cfg, run)
    params = flatten_params(redact(spec.model_dump(mode="json")))
    try:
        with _fail_fast():
            c = client(uri)
            experiment = c.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                experiment_id = c.create_experiment(cfg.experiment)
            elif experiment.lifecycle_stage != "active":
                raise TrackingError(f"tracking.mlflow.experiment: {cfg.experiment!r} is deleted in {uri}; restore it "
                                    "(mlflow experiments restore) or name another experiment")
            else:
                experiment_id = experiment.experiment_id
                if cfg.tracking_uri is None and not experiment.artifact_location.startswith(uri):
                    # MLflow records absolute artifact locations: the store of a copied run directory still names the original's.
                    print(f"note: MLflow keeps experiment {cfg.experiment!r}'s artifacts in {experiment.artifact_location}, outside "
                          f"{run.mlruns} (a copied run directory?); name another tracking.mlflow.experiment to keep them here", flush=True)
            run_id, why = _continued(c, run, uri, experiment_id, params)
            if run_id is not None:
                c.update_run(run_id, status="RUNNING")
            else:
                run_id = _new_run(c, run, experiment_id, params)
            write_atomic(run.mlflow_run, json.dumps({"tracking_uri": uri, "experiment": cfg.experiment, "experiment_id": experiment_id,
                                                     "run_id": run_id}, indent=2))
            if run.spec.exists():
                c.log_artifact(run_id, str(run.spec))
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"tracking.mlflow: cannot log to {uri} (experiment {cfg.experiment!r}): "
                            f"{type(err).__name__}: {str(err)[:500]}") from err
    verb = "continuing" if why is None else f"new ({why})"
    print(f"==> tracking: MLflow run {run_id} in experiment {cfg.experiment!r} at {uri}, {verb}", flush=True)
    return TrackedRun(uri, run_id, new=why is not None)


def _continued(c, run: RunDir, uri: str, experiment_id: str, params: dict[str, str]) -> tuple[str | None, str | None]:
    """(The MLflow run a re-run continues, None) or (None, why a new one starts)."""
    try:
        state = json.loads(run.mlflow_run.read_text())
    except (OSError, ValueError):
        return None, "first tracked run of this directory"
    if state.get("tracking_uri") != uri or state.get("experiment_id") != experiment_id:
        return None, "another store or experiment than the last one"
    from mlflow.exceptions import MlflowException

    try:
        earlier = c.get_run(state.get("run_id", ""))
    except MlflowException:
        return None, f"the last MLflow run {state.get('run_id')} is gone"
    if earlier.info.lifecycle_stage != "active":
        return None, f"the last MLflow run {earlier.info.run_id} was deleted"
    if earlier.data.params != params:
        changed = sorted(k for k in set(params) | set(earlier.data.params) if params.get(k) != earlier.data.params.get(k))
        return None, f"the spec changed since MLflow run {earlier.info.run_id}: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}"
    return earlier.info.run_id, None


def _new_run(c, run: RunDir, experiment_id: str, params: dict[str, str]) -> str:
    from mlflow.entities import Param

    import raydistill

    tags = {TAG_RUN_DIR: str(run.root.resolve()), "raydistill.version": raydistill.__version__, "mlflow.source.name": "raydistill run"}
    run_id = c.create_run(experiment_id, run_name=run.root.resolve().name, tags=tags).info.run_id
    for chunk in batches([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
        c.log_batch(run_id, params=chunk)
    return run_id


# --------------------------------------------------------------------------- the train workers


class StepLogger:
    """Rank 0's per-step metrics to MLflow. The first failure is reported and ends the logging, not the training:
    each further step would wait out MLflow's retries again."""

    def __init__(self, tracked: TrackedRun, prefix: str = "train/"):
        self.tracked, self.prefix, self.failed = tracked, prefix, False

    def step(self, record: dict) -> None:
        if self.failed:
            return
        try:
            self.tracked.log_metrics(step_metrics(record, self.prefix), step=int(record["step"]))
        except Exception as err:
            self.failed = True
            warn(f"step {record.get('step')} to MLflow run {self.tracked.run_id}; the training goes on without it", err)
