"""Interrupted training: SIGINT / SIGKILL in the middle of an epoch keep no partial output, leave no
MLflow run RUNNING for ever, and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import specs
from fmnist import checkpoint
from fmnist.commands import train
from fmnist.core import engine, losses, models
from fmnist.data.loader import load_split, load_stats
from fmnist.runspec import RunPaths
from reliability_helpers import REPO, make_repo, runs, start, temp_files, wait_for_versions

# A slow enough epoch (135 batches) for a signal to land inside it, and enough of them that the
# run is still going when the signal comes, even on a busy machine.
EPOCHS = 10
SUBPROCESS_SETS = ["--set", "train.batch_size=4", "--set", f"train.epochs={EPOCHS}"]
RESULT_KEYS = ("epochs", "best_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "n_train")




def outputs(root: Path, name: str) -> dict:
    """What a finished run leaves: its metrics, history (without wall-clock columns) and weights."""
    p = RunPaths.of(name)
    metrics = json.loads((root / p.train_metrics).read_text())
    with open(root / p.history, newline="") as f:
        history = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]
    return {"metrics": {k: metrics[k] for k in RESULT_KEYS}, "history": history,
            "state": checkpoint.load_file(root / p.model)["state_dict"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["history"] == b["history"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def assert_nothing_kept(root: Path, name: str) -> None:
    p = RunPaths.of(name)
    assert not (root / p.model).exists()
    assert not (root / p.train_metrics).exists() and not (root / p.history).exists()
    assert temp_files(root) == []
    # The state kept for --resume lies outside models/, which the report and register stages depend on
    # as a whole: an interrupted training changes no stage's dependencies.
    assert (root / p.resume).is_file()
    assert not (root / "models").exists() or not any((root / "models").iterdir())


def reference(repo: Path, processed_dir: Path, monkeypatch, fmnist, *args: str) -> dict:
    """The outputs of `fmnist train ARGS` never interrupted, in a repository of their own."""
    ref = make_repo(repo / "reference", processed_dir)
    with monkeypatch.context() as m:
        m.chdir(ref)
        rc, _, err = fmnist("train", *args)
        assert rc == 0, err
        assert [r.info.status for r in runs(ref / "mlflow.db")] == ["FINISHED"]
        return outputs(ref, args[0])


def test_sigint_mid_epoch_keeps_nothing_then_resume_matches_uninterrupted(repo, processed_dir, fmnist,
                                                                          monkeypatch, caplog):
    proc = start(["train", "linear", "--no-progress", *SUBPROCESS_SETS], repo)
    t1, t2 = wait_for_versions(repo / ".fmnist/resume/linear.pt", 2, proc)  # epochs 1 and 2 done
    time.sleep((t2 - t1) / 2)  # the middle of epoch 3
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert "fmnist train: interrupted; no partial output was kept" in err
    assert "Traceback" not in err
    assert_nothing_kept(repo, "linear")
    assert not (repo / "reports").exists()
    state = checkpoint.load_file(repo / ".fmnist/resume/linear.pt")
    assert 2 <= state["state"]["epoch"] < EPOCHS  # the last completed epoch; the interrupted one is not kept
    [killed] = runs(repo / "mlflow.db", "linear")
    assert killed.info.status == "KILLED"

    expected = reference(repo, processed_dir, monkeypatch, fmnist, "linear", *SUBPROCESS_SETS)
    with caplog.at_level(logging.WARNING):
        rc, _, err = fmnist("train", "linear", "--resume", *SUBPROCESS_SETS)
    assert rc == 0, err
    assert f"continuing from epoch {state['state']['epoch']}" in caplog.text
    assert not (repo / ".fmnist/resume/linear.pt").exists()
    [resumed] = runs(repo / "mlflow.db", "linear")
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert_same(expected, outputs(repo, "linear"))


def test_sigkill_mid_epoch_run_is_reaped_and_next_run_is_clean(repo, processed_dir, fmnist, monkeypatch, caplog):
    proc = start(["train", "linear", "--no-progress", "--set", "train.batch_size=4", "--set", "train.epochs=50"],
                 repo)
    t1, t2 = wait_for_versions(repo / ".fmnist/resume/linear.pt", 2, proc)
    time.sleep((t2 - t1) / 2)
    proc.kill()
    proc.communicate(timeout=30)

    assert proc.returncode == -signal.SIGKILL
    assert_nothing_kept(repo, "linear")
    [orphan] = runs(repo / "mlflow.db", "linear")
    assert orphan.info.status == "RUNNING"  # a killed process cannot close its run; the next start does
    # A writer killed inside fmnist.atomic leaves its temp file: the next run of the stage removes it.
    stale = [repo / "models/.linear.pt.x1.tmp", repo / "reports/train/linear/.metrics.json.x2.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")

    sets = ["--set", "train.batch_size=64", "--set", "train.epochs=2"]
    expected = reference(repo, processed_dir, monkeypatch, fmnist, "linear", *sets)
    with caplog.at_level(logging.WARNING):
        rc, _, err = fmnist("train", "linear", "--resume", *sets)  # the resume file has other params
    assert rc == 0, err
    assert "made with other params; training from the start" in caplog.text
    assert temp_files(repo) == []
    assert not (repo / ".fmnist/resume/linear.pt").exists()
    reaped, new = runs(repo / "mlflow.db", "linear")
    assert reaped.info.run_id == orphan.info.run_id and reaped.info.status == "KILLED"
    assert new.info.status == "FINISHED"
    assert_same(expected, outputs(repo, "linear"))  # the other run's state was not used


def ctrl_c() -> None:
    raise KeyboardInterrupt


def interrupt_at_batch(monkeypatch, n: int, interrupt=ctrl_c) -> None:
    """Interrupt training in its n-th batch (from inside the loss), by default as Ctrl-C does."""
    real = losses.make_loss
    calls = [0]

    def make_loss(*args, **kwargs):
        fn = real(*args, **kwargs)

        def loss(out, y):
            calls[0] += 1
            if calls[0] == n:
                interrupt()
            return fn(out, y)
        return loss

    monkeypatch.setattr(losses, "make_loss", make_loss)


def test_sigterm_mid_epoch_ends_like_ctrl_c(repo, fmnist, monkeypatch):
    """SIGTERM (what CI and schedulers send to cancel) is handled as Ctrl-C: the run ends KILLED."""
    interrupt_at_batch(monkeypatch, 20, lambda: os.kill(os.getpid(), signal.SIGTERM))  # epoch 3, 9 batches each
    rc, _, err = fmnist("train", "linear", "--set", "train.batch_size=64", "--set", "train.epochs=3")
    assert rc == 130, err
    assert_nothing_kept(repo, "linear")
    assert checkpoint.load_file(repo / ".fmnist/resume/linear.pt")["state"]["epoch"] == 2
    assert [r.info.status for r in runs(repo / "mlflow.db", "linear")] == ["KILLED"]


# --------------------------------------------------------------------------- resume restores every RNG

RNG_SETS = ["train.epochs=4", "train.batch_size=32", "models.ffn_bn.widths=[16]", "models.ffn_bn.dropout=0.3",
            "train.augment.flip=true", "train.augment.shift=2", "train.augment.erase=0.5"]
STEPS_PER_EPOCH = 17  # 540 images / 32


def test_train_resume_param_restores_rng_state_exactly(repo, processed_dir, monkeypatch):
    """Dropout draws from the global RNG, shuffling and augmentation from the loader's generator:
    a resume that restored either one wrongly would give other weights."""
    spec = specs(*RNG_SETS)["ffn_bn"]
    train.run(spec)
    expected = outputs(repo, "ffn_bn")

    with monkeypatch.context() as m:
        interrupt_at_batch(m, 2 * STEPS_PER_EPOCH + 8)  # the middle of epoch 3
        with pytest.raises(KeyboardInterrupt):
            train.run(spec)
    resume_file = repo / ".fmnist/resume/ffn_bn.pt"
    saved = checkpoint.load_file(resume_file)
    assert saved["state"]["epoch"] == 2
    assert runs(repo / "mlflow.db", "ffn_bn")[-1].info.status == "KILLED"

    # Controls: the same resume file with either RNG state changed gives another result, so the
    # comparison below would catch a resume that lost one of them.
    for key in ("torch_rng", "data_rng"):
        tampered = dict(saved, **{key: torch.Generator().manual_seed(123).get_state()})
        torch.save(tampered, resume_file)
        train.run(spec, resume=True)
        got = outputs(repo, "ffn_bn")
        assert got["metrics"]["val_loss"] != expected["metrics"]["val_loss"], key
        torch.save(saved, resume_file)

    monkeypatch.setenv(train.RESUME_ENV, "1")  # the stage, as `FMNIST_RESUME=1 dvc repro` runs it
    train.run(spec, resume=train.resume_requested(False))
    assert_same(expected, outputs(repo, "ffn_bn"))
    assert not resume_file.exists()


def test_resume_after_early_stop_does_not_train_on(processed_dir, monkeypatch):
    """A run killed after the epoch that triggered early stopping (before its outputs were
    written) resumes as stopped, instead of training further epochs."""
    spec = specs("train.epochs=6", "train.batch_size=64", "train.patience=1", params=REPO / "params.yaml")["linear"]
    data = (load_split("train", processed_dir), load_split("val", processed_dir), load_stats(processed_dir))
    val_losses: list[float] = []
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"loss": val_losses.pop(0), "accuracy": 0.5})

    def fit(losses_seen, **kwargs):
        val_losses[:] = losses_seen
        engine.seed_everything(spec.seed)
        model = models.build("linear", {})
        return engine.fit(model, *data, spec.train, losses.make_loss(spec.loss), seed=spec.seed, **kwargs)

    full = fit([1.0, 0.5, 0.7])  # epoch 3 is worse than epoch 2: stop after it (patience 1)
    assert [r["epoch"] for r in full.history] == [1, 2, 3] and full.stopped_early and full.best_epoch == 2

    snapshots = {}
    fit([1.0, 0.5, 0.7], on_epoch=lambda row, snap: snapshots.setdefault(int(row["epoch"]), snap))
    resumed = fit([0.9, 0.9, 0.9], resume=snapshots[3])  # only epochs trained after the resume would use these
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.stopped_early and resumed.best_epoch == 2
