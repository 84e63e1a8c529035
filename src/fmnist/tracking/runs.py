"""A training's MLflow run: opened by the train stage (and reopened to resume), given per-epoch and
final metrics, artifacts, its lineage and system metrics; added to by evaluate; read back by
report and compare. Tracking never decides the result: the stages write the DVC outputs themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from fmnist.tracking.store import (FIX_STORE, TrackingError, _first_contact, cause, client, experiment_name,
                                   repo_root, retry, tracking_uri)

T = TypeVar("T")


def _experiment_id(c) -> str:
    return retry(lambda: c.get_experiment_by_name(experiment_name())).experiment_id


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=repo_root())
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(c, model: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``model`` whose process on this host is gone
    (a SIGKILL gives a process no chance to close its run)."""
    host = socket.gethostname()
    runs = retry(lambda: c.search_runs(
        [_experiment_id(c)], f"tags.model = '{model}' and attributes.status = 'RUNNING'", max_results=100))
    reaped = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("fmnist.pid")
        if tags.get("fmnist.host") == host and pid and pid.isdigit() and not _pid_alive(int(pid)):
            retry(lambda: c.set_terminated(run.info.run_id, "KILLED"))
            reaped.append(run.info.run_id)
    return reaped


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(list(v) if isinstance(v, tuple) else v)
    return out


# A store that stops answering during a run (a server that went away): the stage fails with this.
FIX_STORE_DURING = ("bring the server back (or fix MLFLOW_TRACKING_URI) and run the stage again; "
                    "`fmnist train MODEL --resume` goes on from the last finished epoch")


def _during_run(uri: str, run_id: str | None, fn: Callable[[], T]) -> T:
    """``fn()``, MLflow's own retries included; a store that still fails is a TrackingError, one line."""
    try:
        return retry(fn)
    except Exception as e:
        during = f"during run {run_id}" if run_id else "while opening a run"
        raise TrackingError(f"MLflow tracking store {uri} failed {during} ({cause(e)}); {FIX_STORE_DURING}") from e


class Run:
    """One training run: per-epoch metrics, final metrics and artifacts. A store that fails on the way
    raises TrackingError."""

    def __init__(self, c, run_id: str):
        self.client, self.run_id = c, run_id

    def _call(self, fn: Callable[[], T]) -> T:
        return _during_run(self.client.tracking_uri, self.run_id, fn)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=True))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        self._call(lambda: self.client.log_dict(self.run_id, obj, name))

    def log_figure(self, fig: Any, name: str) -> None:
        self._call(lambda: self.client.log_figure(self.run_id, fig, name))

    def log_input(self, name: str, digest: str, source: dict[str, Any], context: str, rows: int) -> None:
        """Lineage: the run used data set ``name`` (``digest``: DVC's hash of it) as ``context`` (train,
        validation). A run keeps one input per name and digest (MLflow drops the rest), so each split is
        a data set of its own, NAME-CONTEXT, tagged with its context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=f"{name}-{context}", digest=digest, source_type="local", source=json.dumps(source),
                     profile=json.dumps({"num_rows": rows}))
        self._call(lambda: self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(ds, [InputTag("mlflow.data.context", context)])]))


def _end_quietly(c, run_id: str, status: str) -> None:
    """Mark the run ``status`` if the store lets us: the error that ended it is the one to report."""
    with contextlib.suppress(Exception):
        retry(lambda: c.set_terminated(run_id, status))


@contextlib.contextmanager
def start_run(model: str, loss: str, params: dict[str, Any], run_id: str | None = None,
              tags: dict[str, str] | None = None, system_metrics: bool = True) -> Iterator[Run]:
    """Open (or, to resume, reopen) the run ``MODEL-LOSS``; it ends FINISHED, or
    FAILED on an error, or KILLED on Ctrl-C / SIGTERM. MLflow's system metrics (CPU, memory,
    disk, network, GPU) are sampled while it is open."""
    from mlflow.entities import Param, RunTag

    c = client()
    uri = c.tracking_uri
    tags = {"model": model, "loss": loss, "fmnist.host": socket.gethostname(), "fmnist.pid": str(os.getpid()),
            **(tags or {})}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = exp

    def begin() -> str:
        reap_orphans(c, model)
        if run_id is not None:  # resuming: the same run goes on
            retry(lambda: c.update_run(run_id, status="RUNNING"))
            retry(lambda: c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True))
            return run_id
        new = retry(lambda: c.create_run(_experiment_id(c), run_name=f"{model}-{loss}", tags=tags)).info.run_id
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            retry(lambda i=i: c.log_batch(new, params=items[i:i + 100], synchronous=True))
        return new

    resumed = run_id is not None
    run_id = _during_run(uri, run_id, begin)
    monitor = _system_metrics(run_id, uri, resumed) if system_metrics else None
    try:
        yield Run(c, run_id)
    except KeyboardInterrupt:
        _end_quietly(c, run_id, "KILLED")
        raise
    except TrackingError:  # the store failed: try once, briefly, to end the run FAILED; if the store is
        with _first_contact(uri):  # gone, the run stays RUNNING until the next training of this model
            _end_quietly(c, run_id, "FAILED")  # finds its process dead and marks it KILLED (reap_orphans)
        raise
    except BaseException:
        _end_quietly(c, run_id, "FAILED")
        raise
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
    _during_run(uri, run_id, lambda: c.set_terminated(run_id, "FINISHED"))


SYSTEM_METRICS_INTERVAL_S = 5


def _system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's own sampler of CPU, memory, disk and network use (and GPUs), logged to the run as
    system/... metrics every few seconds; None where it cannot run (psutil missing)."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # its start/stop chatter, and the
    try:                                                                  # store's failures, are reported once
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # an optional extra: never a reason to fail a training
        return None


def existing_run(run_id: str | None) -> Run | None:
    """The run a checkpoint names, if this store has it."""
    if not run_id:
        return None
    c = client()
    try:
        retry(lambda: c.get_run(run_id))
    except Exception:
        return None
    return Run(c, run_id)


def run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of a run of this store; None if the store has no such run."""
    from mlflow import MlflowClient

    try:
        return dict(retry(lambda: MlflowClient(tracking_uri=tracking_uri()).get_run(run_id)).data.tags)
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return None
        raise TrackingError(f"MLflow tracking store {tracking_uri()} cannot be read ({cause(e)}); {FIX_STORE}") from e


def metric_histories(run_id: str, keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """Metric -> {step: value} of one run (per-epoch metrics are logged with step = epoch)."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri())
    try:
        return {k: {m.step: m.value for m in retry(lambda k=k: c.get_metric_history(run_id, k))} for k in keys}
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {tracking_uri()} cannot be read ({cause(e)}); {FIX_STORE}") from e


def finished_runs(experiment: str | None = None, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The FINISHED runs of an experiment carrying every tag in ``tags``, newest first, as plain
    dicts (run_id, start_time, tags, params, metrics), so callers never touch MLflow objects."""
    from mlflow import MlflowClient

    name = experiment or experiment_name()
    uri = tracking_uri()
    where = ["attributes.status = 'FINISHED'"]
    for k, v in (tags or {}).items():
        if any(q in k for q in "`'\"") or "'" in v:
            raise TrackingError(f"tag filter {k}={v}: quotes and backticks are not allowed")
        where.append(f"tags.`{k}` = '{v}'")
    try:
        with _first_contact(uri):
            c = MlflowClient(tracking_uri=uri)
            exp = retry(lambda: c.get_experiment_by_name(name))
        if exp is None:
            names = sorted(e.name for e in retry(lambda: c.search_experiments()))
            raise TrackingError(f"no MLflow experiment {name!r} in {uri}; "
                                f"experiments there: {', '.join(names) or 'none'}")
        runs, token = [], None
        while True:
            page = retry(lambda: c.search_runs([exp.experiment_id], " and ".join(where), max_results=1000,
                                                order_by=["attributes.start_time DESC"], page_token=token))
            runs.extend(page)
            token = page.token
            if not token:
                break
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri} cannot be read ({cause(e)}); {FIX_STORE}") from e
    return [{"run_id": r.info.run_id, "start_time": r.info.start_time, "tags": dict(r.data.tags),
             "params": dict(r.data.params), "metrics": dict(r.data.metrics)} for r in runs]


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # off for one small file: no bar on the terminal


def json_artifact(run_id: str, name: str) -> Any | None:
    """A JSON artifact at the top of a run's artifacts (as ``Run.log_dict`` writes them); None if the
    run has none of that name (a run evaluated before the artifact existed)."""
    from unittest import mock

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri())
    try:
        if name not in {a.path for a in retry(lambda: c.list_artifacts(run_id))}:
            return None
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {PROGRESS_BAR: "false"}):
            return json.loads(Path(retry(lambda: c.download_artifacts(run_id, name, tmp))).read_text())
    except Exception as e:
        raise TrackingError(f"MLflow run {run_id}: its artifact {name} cannot be read ({cause(e)}); {FIX_STORE}") from e
