"""Helpers shared by the reliability tests (test_interrupt, test_tracking_faults, test_reliability):
a scratch repository with processed data, the `fmnist` command as a subprocess, and what is on disk."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_repo(root: Path, processed: Path) -> Path:
    """A repository root as `dvc repro` sees it: params.yaml, dvc.yaml and data/processed/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(processed, root / "data" / "processed")
    return root


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1", MLFLOW_ENABLE_ASYNC_LOGGING="false",
             GIT_PYTHON_REFRESH="quiet", PYTHONPATH=str(REPO / "src"))
    e.update(extra)
    return e


def start(args: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    """`python -m fmnist ARGS` in ``cwd``, SIGINT not ignored (a background shell job would ignore it)."""
    return subprocess.Popen([sys.executable, "-m", "fmnist", *args], cwd=cwd, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a file's current version: an atomic replace gives a new (inode, mtime)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_versions(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> list[float]:
    """Wait until ``path`` has been (re)written ``n`` times; the time of each version."""
    times, last, deadline = [], None, time.monotonic() + timeout
    while len(times) < n:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} was written {len(times)} times in {timeout} s, expected {n}")
        s = stamp(path)
        if s is not None and s != last:
            times.append(time.monotonic())
            last = s
        time.sleep(0.003)
    return times


def temp_files(root: Path) -> list[Path]:
    """Temp files fmnist.atomic leaves only if a writer was killed."""
    return sorted(p for p in root.rglob(".*.tmp"))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: for a server to start on, or to find closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs(db: Path, model: str | None = None) -> list:
    """Every MLflow run in the SQLite store ``db`` (optionally of one model), oldest first."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = c.search_experiments()
    where = f"tags.model = '{model}'" if model else ""
    found = c.search_runs([e.experiment_id for e in exps], where, max_results=1000,
                          order_by=["attributes.start_time ASC"]) if exps else []
    return list(found)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until GET ``url`` answers 200. AssertionError if ``proc`` (the server) exits or time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.25)
