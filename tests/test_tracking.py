"""MLflow tracking of the train and evaluate stages, read back through MlflowClient: one run per
training named MODEL-LOSS with its tags, params, per-epoch and final metrics and artifacts; the test
metrics in the same run; where the store lives (repo root, DVC_ROOT, MLFLOW_TRACKING_URI); a crash
ends the run FAILED."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import specs
from fmnist import checkpoint, tracking
from fmnist.commands import evaluate, train
from fmnist.config import EvalConfig, TrainConfig
from fmnist.core import losses, models
from fmnist.data.loader import load_split
from reliability_helpers import make_repo

SETS = ["train.epochs=2", "train.subset=200", "train.batch_size=50"]
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")




def load(*overrides: str, model: str = "linear"):
    """One model's run spec from the scratch repository's params.yaml, with SETS and ``overrides``."""
    return specs(*SETS, *overrides)[model]


def runs(store: Path | str) -> list:
    uri = store if isinstance(store, str) else f"sqlite:///{store}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("fashion-mnist")
    return c.search_runs([exp.experiment_id]) if exp else []


def history(root: Path, name: str) -> list[dict]:
    with open(root / "reports/train" / name / "history.csv") as f:
        return list(csv.DictReader(f))


def git(root: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_training_and_evaluation_are_one_finished_run(repo, monkeypatch):
    git(repo, "init", "-q")
    git(repo, "commit", "-q", "--allow-empty", "-m", "base")
    commit = git(repo, "rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-kite")
    # A model key of its own over another architecture, with its own train override, and the focal loss.
    spec = load("+models.tiny.arch=tinyvgg", "+models.tiny.hidden_units=4", "+models.tiny.train.lr=0.005",
                "loss=focal", "focal.gamma=1.5", model="tiny")
    result = train.run(spec)
    test = evaluate.run(spec)

    [run] = runs(repo / "mlflow.db")
    c = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-focal"
    tags = run.data.tags
    assert (tags["model"], tags["loss"], tags["dvc_exp_name"]) == ("tiny", "focal", "brisk-kite")
    assert tags["mlflow.source.git.commit"] == commit

    # params: every resolved hyperparameter, flattened, and the parameter count
    p = run.data.params
    n = models.count_parameters(models.build("tinyvgg", {"hidden_units": 4}))
    assert p["n_parameters"] == str(n) == str(result["n_parameters"])
    assert (p["model"], p["arch"], p["hparams.hidden_units"], p["loss"], p["seed"]) == ("tiny", "tinyvgg", "4", "focal",
                                                                                     "42")
    assert (p["train.lr"], p["train.epochs"], p["train.subset"], p["focal.gamma"]) == ("0.005", "2", "200", "1.5")
    assert (p["train.augment.flip"], p["train.augment.shift"], p["data.val_fraction"]) == ("False", "0", "0.1")
    every = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.name != "augment"}
    every |= {f"evaluate.{f.name}" for f in dataclasses.fields(EvalConfig)}
    assert every <= set(p)
    assert p == {**tracking.flatten(spec.trained_with()), "evaluate.batch_size": "1000", "evaluate.tta_flip": "False",
                 "n_parameters": str(n)}

    # per-epoch metrics at step = epoch, equal to history.csv; final metrics
    rows = history(repo, "tiny")
    for key in EPOCH_METRICS:
        logged = sorted((m.step, m.value) for m in c.get_metric_history(rid, key))
        assert logged == [(int(r["epoch"]), pytest.approx(float(r[key]), rel=1e-12)) for r in rows], key
    m = run.data.metrics
    assert m["best_epoch"] == result["best_epoch"]
    assert m["train_time_s"] == pytest.approx(result["train_time_s"], abs=0.01)
    assert 0 < m["train_time_s"] <= float(rows[-1]["elapsed_s"])  # the training loop only
    assert {k: m[evaluate.MLFLOW_NAMES.get(k, k)] for k in test} == test  # every figure evaluate wrote
    assert m["val_accuracy"] == float(rows[-1]["val_accuracy"])  # the training's curve is left as it was

    # artifacts: the checkpoint (naming this run) and history.csv
    names = {a.path for a in c.list_artifacts(rid)}
    assert {"tiny.pt", "history.csv"} <= names
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlartifacts")
    got = Path(c.download_artifacts(rid, "tiny.pt", str(repo / "dl")))
    _, ckpt = checkpoint.load(got)
    assert ckpt.run_id == rid and ckpt.spec == spec
    assert Path(c.download_artifacts(rid, "history.csv", str(repo / "dl"))).read_text() == \
        (repo / "reports/train/tiny/history.csv").read_text()


def test_run_without_git_or_dvc_has_no_such_tags(repo, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(repo.parent))  # no repository above the scratch one
    train.run(load())
    [run] = runs(repo / "mlflow.db")
    assert run.info.run_name == "linear-ce" and run.data.tags["loss"] == "ce"
    assert "dvc_exp_name" not in run.data.tags and "mlflow.source.git.commit" not in run.data.tags
    assert "focal.gamma" not in run.data.params  # focal params only when the loss is focal


def test_the_run_records_the_splits_it_trained_on_with_dvcs_hash(repo, monkeypatch):
    import hashlib

    import yaml

    def inputs(run) -> dict:
        return {(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"], json.loads(d.dataset.profile)[
            "num_rows"]): {t.key: t.value for t in d.tags}["mlflow.data.context"] for d in run.inputs.dataset_inputs}

    spec = load()
    train.run(spec)  # by hand: the MD5 of the training file
    md5 = hashlib.md5((repo / "data/processed/train.pt").read_bytes()).hexdigest()
    n_val = len(load_split("val", repo / "data/processed"))
    [by_hand] = runs(repo / "mlflow.db")
    assert inputs(by_hand) == {("fashion-mnist-train", md5, "data/processed/train.pt", 200): "train",
                               ("fashion-mnist-validation", md5, "data/processed/train.pt", n_val): "validation"}

    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"preprocess": {"outs": [
        {"path": "data/processed", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    monkeypatch.setenv("DVC_STAGE", "train@linear")  # under `dvc repro`: the hash dvc.lock records
    train.run(spec)
    under_dvc = next(r for r in runs(repo / "mlflow.db") if r.info.run_id != by_hand.info.run_id)
    assert inputs(under_dvc) == {
        ("fashion-mnist-train", "0123456789abcdef0123456789abcdef.dir", "data/processed", 200): "train",
        ("fashion-mnist-validation", "0123456789abcdef0123456789abcdef.dir", "data/processed", n_val): "validation"}


def test_queued_experiment_copy_logs_to_the_real_root(repo, processed_dir, monkeypatch):
    copy = make_repo(repo / ".dvc/tmp/exps/tmp3f9a1c", processed_dir)  # what `dvc exp run --queue` runs in
    monkeypatch.chdir(copy)
    assert tracking.tracking_uri() == f"sqlite:///{copy / 'mlflow.db'}"  # what we would get without DVC_ROOT
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "queued-one")
    spec = load()
    train.run(spec)
    test = evaluate.run(spec)

    assert (copy / "models/linear.pt").is_file() and (copy / "reports/eval/linear/metrics.json").is_file()
    assert not (copy / "mlflow.db").exists() and not (copy / "mlartifacts").exists()
    [run] = runs(repo / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == "queued-one"
    assert run.data.metrics["test_accuracy"] == test["test_accuracy"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlartifacts")


def test_mlflow_tracking_uri_overrides_the_default_store(repo, tmp_path, monkeypatch):
    store = tmp_path / "team" / "tracking.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    spec = load()
    train.run(spec)
    evaluate.run(spec)
    assert not (repo / "mlflow.db").exists()
    [run] = runs(store)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics


def test_crash_inside_training_marks_the_run_failed(repo, monkeypatch):
    real = losses.make_loss
    calls = 0

    def breaking(*args, **kwargs):
        fn = real(*args, **kwargs)

        def loss(*a, **k):
            nonlocal calls
            calls += 1
            if calls == 6:  # the second epoch (4 batches an epoch)
                raise RuntimeError("simulated crash")
            return fn(*a, **k)
        return loss

    monkeypatch.setattr(losses, "make_loss", breaking)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(load())
    [run] = runs(repo / "mlflow.db")
    assert run.info.status == "FAILED"
    c = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")] == [1]
    assert not (repo / "models/linear.pt").exists() and not (repo / "reports/train/linear").exists()

    monkeypatch.setattr(losses, "make_loss", real)  # the next training is a new, clean run
    train.run(load())
    statuses = sorted(r.info.status for r in runs(repo / "mlflow.db"))
    assert statuses == ["FAILED", "FINISHED"]


def test_flatten_nests_with_dots_and_lists_stay_lists():
    flat = tracking.flatten({"a": 1, "b": {"c": (1, 2), "d": {"e": True}}, "f": [0.5]})
    assert flat == {"a": "1", "b.c": "[1, 2]", "b.d.e": "True", "f": "[0.5]"}


def test_store_location(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "src" / "deep").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "src" / "deep")  # found upwards from a subfolder
    assert tracking.tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "other"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"
