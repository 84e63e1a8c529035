"""Training as several processes with torch.distributed's launcher: `fmnist train M --nproc 2` and
`torchrun ... -m fmnist train M` take the steps one process takes with the same global batch, only
rank 0 writes and logs, and a worker that dies stops the run with nothing partial left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmnist import checkpoint
from reliability_helpers import env, make_repo, runs, start, temp_files, wait_for_versions

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

SETS = ["--set", "train.subset=400", "--set", "train.epochs=2", "--set", "train.batch_size=50"]


def train(repo: Path, model: str, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`fmnist train MODEL` with SETS, then ``args`` (which win over SETS)."""
    cmd = launcher or [sys.executable, "-m", "fmnist"]
    return subprocess.run([*cmd, "train", model, "--no-progress", *SETS, *args], cwd=repo, env=env(),
                          capture_output=True, text=True, timeout=600)


def weights(repo: Path, model: str) -> dict[str, torch.Tensor]:
    return checkpoint.load_file(repo / "models" / f"{model}.pt")["state_dict"]


@pytest.mark.parametrize("model, sets", [("linear", []), ("mlp512", ["--set", "models.mlp512.hidden=64"])])
def test_two_processes_take_the_same_steps_as_one(tmp_path, processed_dir, model, sets):
    one, two = make_repo(tmp_path / "one", processed_dir), make_repo(tmp_path / "two", processed_dir)
    a = train(one, model, *sets)
    b = train(two, model, "--nproc", "2", *sets)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    wa, wb = weights(one, model), weights(two, model)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)
    ma, mb = json.loads(a.stdout), json.loads(b.stdout)  # only rank 0 prints its metrics
    assert mb["n_train"] == ma["n_train"] == 400 and mb["epochs"] == 2
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):  # all-reduced over the ranks
        assert mb[key] == pytest.approx(ma[key], abs=1e-5), key
    assert b.stderr.count("epoch 1/2") == 1  # one process prints
    [run] = runs(two / "mlflow.db")  # and one logs
    assert run.info.status == "FINISHED" and run.data.params["train.nproc"] == "1"  # --nproc is how, not what


def test_torchrun_runs_the_same_command(tmp_path, processed_dir):
    repo = make_repo(tmp_path / "repo", processed_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "fmnist"]
    res = train(repo, "linear", launcher=torchrun)
    assert res.returncode == 0, res.stderr
    alone = make_repo(tmp_path / "alone", processed_dir)
    assert train(alone, "linear").returncode == 0
    for k, v in weights(alone, "linear").items():
        torch.testing.assert_close(weights(repo, "linear")[k], v, rtol=0, atol=1e-5)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """Rank -> pid of the workers torchrun started under ``launcher_pid``."""
    found = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == launcher_pid:
            ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = pid
    return found


def test_a_killed_worker_stops_the_run_and_leaves_nothing(tmp_path, processed_dir):
    repo = make_repo(tmp_path / "repo", processed_dir)
    proc = start(["train", "linear", "--nproc", "2", "--no-progress", "--set", "train.batch_size=4",
                  "--set", "train.epochs=20"], repo)
    try:
        wait_for_versions(repo / ".fmnist/resume/linear.pt", 1, proc, timeout=120)  # epoch 1 done
        ranks = {}
        for _ in range(100):
            ranks = _rank_pids(proc.pid)
            if len(ranks) == 2:
                break
            time.sleep(0.05)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "fmnist train: error: rank 1 of 2 failed (killed by SIGKILL)" in err
    assert not (repo / "models/linear.pt").exists() and not (repo / "reports").exists()
    assert temp_files(repo) == []
    assert [r.info.status for r in runs(repo / "mlflow.db", "linear")] in (["KILLED"], ["FAILED"])


def test_an_interrupted_distributed_run_resumes_to_the_uninterrupted_result(tmp_path, processed_dir):
    sets = ["--set", "train.batch_size=10", "--set", "train.epochs=6"]
    whole = make_repo(tmp_path / "whole", processed_dir)
    res = train(whole, "linear", "--nproc", "2", *sets)
    assert res.returncode == 0, res.stderr

    repo = make_repo(tmp_path / "repo", processed_dir)
    proc = start(["train", "linear", "--nproc", "2", "--no-progress", *SETS, *sets], repo)
    try:
        wait_for_versions(repo / ".fmnist/resume/linear.pt", 2, proc, timeout=120)  # two epochs done
        proc.send_signal(signal.SIGINT)  # Ctrl-C: torchrun stops its workers
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (repo / "models/linear.pt").exists() and (repo / ".fmnist/resume/linear.pt").exists()
    res = train(repo, "linear", "--nproc", "2", "--resume", *sets)
    assert res.returncode == 0, res.stderr
    assert "resume: continuing from epoch" in res.stderr
    for k, v in weights(whole, "linear").items():
        torch.testing.assert_close(weights(repo, "linear")[k], v, rtol=0, atol=1e-6)
    assert [r.info.status for r in runs(repo / "mlflow.db", "linear")] == ["FINISHED"]  # the same run went on
