"""Where runs are stored, and the one way to reach the store.

Default store: ``sqlite:///<repository root>/mlflow.db`` with artifacts in
``<repository root>/mlartifacts``, also when DVC runs a queued experiment in a
temporary copy (DVC sets ``DVC_ROOT`` to the real root). ``MLFLOW_TRACKING_URI``
points elsewhere (an MLflow server, say); it is checked before anything is trained.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from fmnist import FmnistError

EXPERIMENT = "fashion-mnist"
T = TypeVar("T")


class TrackingError(FmnistError):
    """The tracking store cannot be used. The message says what to do."""


class TrackingURIError(TrackingError):
    """MLFLOW_TRACKING_URI is not a tracking URI: a configuration mistake."""

    exit_code = 2


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
    """The store: MLFLOW_TRACKING_URI, checked, or the repository's own SQLite file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return check_uri(uri) if uri else f"sqlite:///{repo_root() / 'mlflow.db'}"


# Stores MLflow itself knows (a database URL may name its driver: postgresql+psycopg2://).
URI_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
URI_EXPECTED = ("expected http://HOST:PORT (a tracking server), sqlite:///PATH or a database URL "
                "(postgresql://, mysql://, mssql://)")


def check_uri(uri: str) -> str:
    """``uri`` if it is a URL MLflow can store runs at, else a TrackingURIError (exit status 2). Caught
    here rather than by MLflow, which takes `localhost:5000` for a scheme and `foo bar` for a folder."""
    from urllib.parse import urlsplit

    def bad(why: str) -> TrackingURIError:
        hint = f"; did you mean http://{uri}?" if re.fullmatch(r"[\w.-]+:\d+", uri) else ""
        return TrackingURIError(f"MLFLOW_TRACKING_URI={uri!r} is not a tracking URI ({why}); {URI_EXPECTED}{hint}")

    if not uri.strip() or any(ch.isspace() or not ch.isprintable() for ch in uri):
        raise bad("blank or with spaces")
    if uri == "databricks":
        return uri
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:  # a port that is not a number, a broken IPv6 address
        raise bad("the port is not a number" if "integer" in str(e) else str(e)) from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise bad("no scheme")
    if scheme.split("+")[0] not in URI_SCHEMES and not _plugin_scheme(scheme):
        raise bad(f"unknown scheme {scheme!r}")
    if scheme in ("http", "https") and not parts.hostname:
        raise bad("no host")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise bad("a SQLite store is sqlite:///PATH")
    return uri


def _plugin_scheme(scheme: str) -> bool:
    """A tracking store scheme an installed MLflow plugin registers."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return scheme in _tracking_store_registry._registry
    except Exception:  # a private registry: if it moves, only the known schemes pass
        return False


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def retry(fn: Callable[[], T], tries: int = 20) -> T:
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


def cause(e: Exception) -> str:
    """Why a store cannot be used, in a few words rather than MLflow's paragraph."""
    text = " ".join(str(e).split())
    for needle, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host"),
                          ("Connection aborted", "connection lost"), ("Connection reset", "connection lost"),
                          ("RemoteDisconnected", "connection lost")):
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
            exp = retry(lambda: c.get_experiment_by_name(experiment_name()))
            if exp is None:
                db = _sqlite_file(uri)
                artifacts = (db.parent / "mlartifacts").as_uri() if db is not None else None
                retry(lambda: c.create_experiment(experiment_name(), artifact_location=artifacts))
    except Exception as e:
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({cause(e)}); {FIX_STORE}") from e
    return c


