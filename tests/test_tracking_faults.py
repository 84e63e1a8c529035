"""Tracking faults: an unreachable MLflow server stops `fmnist train` before any training, fast and
in one line; parallel trainings against one fresh SQLite store all finish and lose no run."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fmnist import tracking
from fmnist.core import engine
from reliability_helpers import free_port, make_repo, start

HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture
def repo(workdir: Path, processed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in HTTP_SETTINGS:  # unset, and unset again after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return make_repo(workdir, processed_dir)


@pytest.fixture
def fmnist(fmnist, monkeypatch):
    """conftest's `fmnist ARGS`, as (exit status, stderr, seconds); fails the test if training starts."""

    def no_fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(engine, "fit", no_fit)

    def run(*args: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        rc, _, err = fmnist(*args)
        return rc, err, time.monotonic() - t0

    return run


def assert_one_line_error(err: str, uri: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("fmnist train: error: MLflow tracking store ") and uri in line
    assert "MLFLOW_TRACKING_URI" in line
    return line


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_unreachable_server_fails_fast_before_training(repo, fmnist, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = tree(repo)
    rc, err, took = fmnist("train", "linear", "--set", "train.epochs=1")
    assert rc == 1
    assert "connection refused" in assert_one_line_error(err, uri)
    assert took < 5, f"took {took:.1f} s to give up on {uri}"
    assert tree(repo) == before  # no models/, reports/, mlflow.db
    # The fast-fail settings were for the first contact only: requests made during a long
    # training keep MLflow's patient retries.
    assert not any(var in os.environ for var in HTTP_SETTINGS)


def test_server_that_never_answers_times_out_as_configured(repo, fmnist, monkeypatch):
    before = tree(repo)
    with socket.socket() as server:  # accepts connections (the kernel does), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's own setting wins
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        rc, err, took = fmnist("train", "linear", "--set", "train.epochs=1")
    assert rc == 1
    assert "timed out" in assert_one_line_error(err, uri)
    assert 1 <= took < 4, f"took {took:.1f} s with a 1 s timeout and no retry"
    assert tree(repo) == before  # no models/, reports/, mlflow.db


def test_parallel_trainings_share_a_fresh_sqlite_store(tmp_path, processed_dir):
    """As `dvc exp run --queue -j 2` does: each experiment in its own copy of the repository, all
    logging to one store that does not exist yet. No run is lost, none fails on a locked database."""
    db = tmp_path / "shared" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    epochs = 3
    procs = [start(["train", model, "--no-progress", "--set", f"train.epochs={epochs}", "--set", "train.batch_size=64"],
                   make_repo(tmp_path / f"exp{i}", processed_dir), MLFLOW_TRACKING_URI=uri)
             for i, model in enumerate(["linear", "mlp"])]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err
        assert "locked" not in err.lower(), err
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(tracking.EXPERIMENT)
    got = c.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["model"] for r in got) == ["linear", "mlp"]
    for r in got:
        assert r.info.status == "FINISHED"
        assert len(c.get_metric_history(r.info.run_id, "val_loss")) == epochs
        assert {"train_time_s", "best_epoch"} <= set(r.data.metrics)
