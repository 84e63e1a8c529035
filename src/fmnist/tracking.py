"""MLflow tracking: the only module that imports mlflow.

Default store: ``sqlite:///<repository root>/mlflow.db`` with artifacts in
``<repository root>/mlartifacts``, also when DVC runs a queued experiment in a
temporary copy (DVC sets ``DVC_ROOT`` to the real root). ``MLFLOW_TRACKING_URI``
points elsewhere (an MLflow server, say). Tracking never decides the result:
the stages write the DVC metrics files themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from fmnist import FmnistError

EXPERIMENT = "fashion-mnist"
T = TypeVar("T")


class TrackingError(FmnistError):
    """The tracking store cannot be used. The message says what to do."""


def repo_root() -> Path:
    """The real repository root: DVC_ROOT when DVC runs us (in a temp copy for queued
    experiments), else the nearest folder upwards holding dvc.yaml or .git."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            return d
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def _retry(fn: Callable[[], T], tries: int = 20) -> T:
    """SQLite allows one writer at a time; parallel experiments wait their turn."""
    for i in range(tries):
        try:
            return fn()
        except Exception as e:  # sqlalchemy OperationalError arrives wrapped in MlflowException
            if "locked" not in str(e).lower() or i == tries - 1:
                raise
            time.sleep(0.05 * 2 ** min(i, 5) * (1 + random.random()))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creation of a SQLite store: several processes creating the schema
    at once race, or fail with "database is locked"."""
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# The first contact with a tracking server gives up in seconds (MLflow's defaults retry for minutes);
# the requests made during training keep MLflow's patient defaults. A user's own settings win.
FIRST_CONTACT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def _first_contact(uri: str) -> Iterator[None]:
    unset = [k for k in FIRST_CONTACT_HTTP if k not in os.environ] if uri.startswith(("http:", "https:")) else []
    os.environ.update({k: FIRST_CONTACT_HTTP[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


FIX_STORE = "start the server, fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite:///<repo>/mlflow.db store"


def _cause(e: Exception) -> str:
    """Why a store cannot be used, in a few words rather than MLflow's paragraph."""
    text = " ".join(str(e).split())
    for needle, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host")):
        if needle in text:
            return words
    return f"{type(e).__name__}: {text[:300]}"


def client():
    """An MlflowClient on the store, with the experiment created; fails fast and
    clearly when the store cannot be reached."""
    uri = tracking_uri()
    from mlflow import MlflowClient

    try:
        with _first_contact(uri), _store_lock(uri):
            c = MlflowClient(tracking_uri=uri)  # creates a new SQLite store's tables: under the lock
            exp = _retry(lambda: c.get_experiment_by_name(experiment_name()))
            if exp is None:
                db = _sqlite_file(uri)
                artifacts = (db.parent / "mlartifacts").as_uri() if db is not None else None
                _retry(lambda: c.create_experiment(experiment_name(), artifact_location=artifacts))
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({_cause(e)}); {FIX_STORE}") from e
    return c


def _experiment_id(c) -> str:
    return _retry(lambda: c.get_experiment_by_name(experiment_name())).experiment_id


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
    runs = _retry(lambda: c.search_runs(
        [_experiment_id(c)], f"tags.model = '{model}' and attributes.status = 'RUNNING'", max_results=100))
    reaped = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("fmnist.pid")
        if tags.get("fmnist.host") == host and pid and pid.isdigit() and not _pid_alive(int(pid)):
            _retry(lambda: c.set_terminated(run.info.run_id, "KILLED"))
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


class Run:
    """One training run: per-epoch metrics, final metrics and artifacts."""

    def __init__(self, c, run_id: str):
        self.client, self.run_id = c, run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        _retry(lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=True))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        _retry(lambda: self.client.log_dict(self.run_id, obj, name))

    def log_figure(self, fig: Any, name: str) -> None:
        _retry(lambda: self.client.log_figure(self.run_id, fig, name))


@contextlib.contextmanager
def start_run(model: str, loss: str, params: dict[str, Any], run_id: str | None = None) -> Iterator[Run]:
    """Open (or, to resume, reopen) the run ``MODEL-LOSS``; it ends FINISHED, or
    FAILED on an error, or KILLED on Ctrl-C / SIGTERM."""
    from mlflow.entities import Param, RunTag

    c = client()
    reap_orphans(c, model)
    tags = {"model": model, "loss": loss, "fmnist.host": socket.gethostname(), "fmnist.pid": str(os.getpid())}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = exp
    if run_id is None:
        run = _retry(lambda: c.create_run(_experiment_id(c), run_name=f"{model}-{loss}", tags=tags))
        run_id = run.info.run_id
        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            _retry(lambda i=i: c.log_batch(run_id, params=items[i:i + 100], synchronous=True))
    else:  # resuming: the same run goes on
        _retry(lambda: c.update_run(run_id, status="RUNNING"))
        _retry(lambda: c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True))
    try:
        yield Run(c, run_id)
    except KeyboardInterrupt:
        _retry(lambda: c.set_terminated(run_id, "KILLED"))
        raise
    except BaseException:
        _retry(lambda: c.set_terminated(run_id, "FAILED"))
        raise
    _retry(lambda: c.set_terminated(run_id, "FINISHED"))


def existing_run(run_id: str | None) -> Run | None:
    """The run a checkpoint names, if this store has it."""
    if not run_id:
        return None
    c = client()
    try:
        _retry(lambda: c.get_run(run_id))
    except Exception:
        return None
    return Run(c, run_id)


def finished_runs(experiment: str | None = None, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The FINISHED runs of an experiment carrying every tag in ``tags``, newest first, as plain
    dicts (run_id, start_time, tags, metrics), so callers never touch MLflow objects."""
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
            exp = _retry(lambda: c.get_experiment_by_name(name))
        if exp is None:
            names = sorted(e.name for e in _retry(lambda: c.search_experiments()))
            raise TrackingError(f"no MLflow experiment {name!r} in {uri}; "
                                f"experiments there: {', '.join(names) or 'none'}")
        runs, token = [], None
        while True:
            page = _retry(lambda: c.search_runs([exp.experiment_id], " and ".join(where), max_results=1000,
                                                order_by=["attributes.start_time DESC"], page_token=token))
            runs.extend(page)
            token = page.token
            if not token:
                break
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri} cannot be read ({_cause(e)}); {FIX_STORE}") from e
    return [{"run_id": r.info.run_id, "start_time": r.info.start_time, "tags": dict(r.data.tags),
             "metrics": dict(r.data.metrics)} for r in runs]
