"""The train and evaluate stages end to end on the synthetic processed data: the files they write,
the checkpoint that rebuilds the model, exact test metrics, identical reruns, and
`fmnist train MODEL --set key=value` through the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from fmnist import checkpoint
from fmnist.core import engine, models
from fmnist.data import CLASSES
from fmnist.data.loader import load_split, load_stats
from fmnist.commands import evaluate, train

from conftest import specs

SETS = ["train.epochs=3", "train.subset=300", "train.batch_size=50"]




def read_history(root: Path, name: str) -> list[dict]:
    with open(root / "reports/train" / name / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def spec(*overrides: str, model: str = "linear"):
    return specs(*SETS, *overrides)[model]


def test_train_writes_model_metrics_and_history(repo):
    s = spec()
    metrics = train.run(s, progress=False)

    rows = read_history(repo, "linear")
    assert list(rows[0]) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < float(r["train_loss"]) and 0 < float(r["val_loss"])
        assert 0 <= float(r["train_accuracy"]) <= 1 and 0 <= float(r["val_accuracy"]) <= 1
        assert 0 < float(r["lr"]) <= s.train.lr
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])  # it learns the synthetic classes
    assert float(rows[-1]["val_accuracy"]) > 0.5

    saved = read_json(repo / "reports/train/linear/metrics.json")
    assert saved == metrics
    last = rows[-1]
    assert saved["epochs"] == 3 and saved["n_train"] == 300
    assert saved["val_accuracy"] == float(last["val_accuracy"]) and saved["val_loss"] == float(last["val_loss"])
    assert saved["train_accuracy"] == float(last["train_accuracy"])
    assert saved["n_parameters"] == models.count_parameters(models.build("linear", {"hidden": 10}))
    assert 0 < saved["train_time_s"] <= float(last["elapsed_s"]) + 0.01
    assert not (repo / ".fmnist/resume/linear.pt").exists()  # the resume state goes once the run is done

    model, ckpt = checkpoint.load(repo / "models/linear.pt")
    assert ckpt.spec == s and ckpt.spec.params_hash == s.params_hash  # the run spec it was trained with
    assert ckpt.classes == CLASSES and ckpt.stats == load_stats("data/processed")
    val = load_split("val", "data/processed")
    again = engine.evaluate(model, val, ckpt.stats, bf16=ckpt.bf16)
    assert again["accuracy"] == saved["val_accuracy"]
    assert again["loss"] == pytest.approx(saved["val_loss"], rel=1e-6)


@pytest.mark.parametrize("patience, kept", [(1, 2), (0, 3)])
def test_metrics_describe_the_kept_model(repo, monkeypatch, patience, kept):
    """With early stopping the best epoch's model is kept and reported; without, the last one."""
    real_evaluate, losses = engine.evaluate, iter([0.9, 0.5, 0.7])

    def scripted(*args, **kwargs):  # the real accuracy, a scripted validation loss
        return {**real_evaluate(*args, **kwargs), "loss": next(losses)}

    monkeypatch.setattr(engine, "evaluate", scripted)
    s = spec(f"train.patience={patience}", "train.precision=fp32", "train.optimizer=sgd", "train.lr=0.5",
             "train.schedule=none")
    metrics = train.run(s, progress=False)
    rows = read_history(repo, "linear")
    assert len(rows) == 3 and metrics["epochs"] == 3 and metrics["best_epoch"] == kept
    row = rows[kept - 1]
    assert metrics["val_loss"] == float(row["val_loss"]) and metrics["val_accuracy"] == float(row["val_accuracy"])
    assert metrics["train_loss"] == float(row["train_loss"])
    model, ckpt = checkpoint.load(repo / "models/linear.pt")
    val = load_split("val", "data/processed")
    assert real_evaluate(model, val, ckpt.stats)["accuracy"] == float(row["val_accuracy"])


def test_evaluate_scores_every_test_image_from_the_checkpoint(repo):
    # 200 test images in batches of 64: a short last batch; one epoch leaves some validation images
    # wrong, so that the validation NLL has a minimum in T (with none wrong, it falls as T -> 0)
    s = spec("evaluate.batch_size=64", "train.precision=fp32", "train.epochs=1")
    train.run(s, progress=False)
    got = evaluate.run(s)
    assert read_json(repo / "reports/eval/linear/metrics.json") == got
    assert list(got) == ["test_accuracy", "test_nll", "test_nll_se", "test_ece", "test_brier", "test_nll_ts",
                         "test_ece_ts", "test_brier_ts", "temperature", "val_accuracy", "val_nll", "macro_f1"]

    model, ckpt = checkpoint.load(repo / "models/linear.pt")  # the file alone: weights and normalisation
    test, val = load_split("test", "data/processed"), load_split("val", "data/processed")

    def logits_of(split):
        x = split.images.unsqueeze(1).float().div(255).sub(ckpt.stats.mean).div(ckpt.stats.std)
        with torch.no_grad():
            return model(x).double()

    logits = logits_of(test)
    per_sample = torch.nn.functional.cross_entropy(logits, test.labels, reduction="none")
    assert got["test_nll"] == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert got["test_nll_se"] == pytest.approx(per_sample.std().item() / len(test) ** 0.5, rel=1e-4)
    assert got["test_accuracy"] == (logits.argmax(1) == test.labels).sum().item() / len(test)
    assert got["test_accuracy"] > 0.5
    val_logits = logits_of(val)  # the validation split, scored as the test set is
    assert got["val_accuracy"] == (val_logits.argmax(1) == val.labels).sum().item() / len(val)
    assert got["val_nll"] == pytest.approx(torch.nn.functional.cross_entropy(val_logits, val.labels).item(), rel=1e-5)

    # the temperature minimises the validation NLL; the _ts scores are the test set's at that T
    def val_nll(t):
        return torch.nn.functional.cross_entropy(val_logits / t, val.labels).item()

    t = got["temperature"]
    assert got["val_accuracy"] < 1 and val_nll(t) < min(val_nll(t * 1.05), val_nll(t / 1.05))
    scaled = torch.log_softmax(logits / t, dim=1)
    assert got["test_nll_ts"] == pytest.approx(torch.nn.functional.nll_loss(scaled, test.labels).item(), rel=1e-5)
    onehot = torch.nn.functional.one_hot(test.labels, 10)
    assert got["test_brier_ts"] == pytest.approx(((scaled.exp() - onehot) ** 2).sum(1).mean().item(), rel=1e-5)

    # calibration.csv: 15 bins before and after scaling, from which the ECEs follow
    with open(repo / "reports/eval/linear/calibration.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["bin_lo", "bin_hi", "count", "confidence", "accuracy", "count_ts", "confidence_ts",
                             "accuracy_ts"]
    assert len(rows) == 15 and float(rows[0]["bin_lo"]) == 0 and float(rows[-1]["bin_hi"]) == 1
    for suffix, ece in (("", got["test_ece"]), ("_ts", got["test_ece_ts"])):
        counts = [int(r[f"count{suffix}"]) for r in rows]
        assert sum(counts) == len(test)
        assert all((r[f"confidence{suffix}"] == "") == (c == 0) for r, c in zip(rows, counts))  # empty: no value
        gaps = [c * abs(float(r[f"confidence{suffix}"]) - float(r[f"accuracy{suffix}"]))
                for r, c in zip(rows, counts) if c]
        assert sum(gaps) / len(test) == pytest.approx(ece, abs=1e-5)

    run = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}").get_run(ckpt.run_id)
    assert {k: run.data.metrics[evaluate.MLFLOW_NAMES.get(k, k)] for k in got} == pytest.approx(got, rel=1e-12)
    logged = json.loads(Path(run.info.artifact_uri.removeprefix("file://"), "calibration.json").read_text())
    assert logged["temperature"] == t and len(logged["bins"]) == 15
    assert logged["bins"][-1] == {k: (None if v == "" else float(v)) for k, v in rows[-1].items()}


def test_same_params_give_identical_results(repo):
    s = spec("train.augment.flip=true", "train.augment.shift=1", model="tinyvgg")
    drop = ("train_time_s", "images_per_s", "elapsed_s")
    first = {k: v for k, v in train.run(s, progress=False).items() if k not in drop}
    rows1 = [{k: v for k, v in r.items() if k not in drop} for r in read_history(repo, "tinyvgg")]
    state1 = checkpoint.load_file(repo / "models/tinyvgg.pt")["state_dict"]
    second = {k: v for k, v in train.run(s, progress=False).items() if k not in drop}
    rows2 = [{k: v for k, v in r.items() if k not in drop} for r in read_history(repo, "tinyvgg")]
    state2 = checkpoint.load_file(repo / "models/tinyvgg.pt")["state_dict"]
    assert first == second and rows1 == rows2
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    other = spec("train.augment.flip=true", "train.augment.shift=1", "seed=7", model="tinyvgg")
    third = {k: v for k, v in train.run(other, progress=False).items() if k not in drop}
    assert third != first


def test_cli_train_and_evaluate_with_overrides(repo, fmnist):
    sets = ["--set", "train.epochs=2", "--set", "train.subset=100", "--set", "train.batch_size=25",
            "--set", "models.linear.hidden=6",
            "--set", "train.optimizer=sgd", "--set", "train.lr=0.05", "--set", "loss=focal"]
    rc, out, err = fmnist("train", "linear", "--no-progress", *sets)
    assert rc == 0, err
    assert json.loads(out) == read_json(repo / "reports/train/linear/metrics.json")
    assert len(read_history(repo, "linear")) == 2 and json.loads(out)["n_train"] == 100
    model, ckpt = checkpoint.load(repo / "models/linear.pt")
    assert ckpt.spec.hparams == {"hidden": 6} and model[1].weight.shape == (6, 784)
    assert ckpt.spec.train.optimizer == "sgd" and ckpt.spec.loss == "focal" and ckpt.spec.focal.gamma == 2.0

    rc, out, err = fmnist("evaluate", "linear", *sets)
    assert rc == 0, err
    assert json.loads(out) == read_json(repo / "reports/eval/linear/metrics.json")

    c = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    [run] = c.search_runs([c.get_experiment_by_name("fashion-mnist").experiment_id])
    assert run.info.run_name == "linear-focal"
    p = run.data.params
    assert (p["train.epochs"], p["train.optimizer"], p["train.lr"], p["hparams.hidden"]) == ("2", "sgd", "0.05", "6")
    assert run.data.metrics["test_accuracy"] == json.loads(out)["test_accuracy"]


@pytest.mark.parametrize("args, start", [
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.learning_rate=0.1"], "--set 'train.learning_rate=0.1': no key"),
    (["--set", "+train.learning_rate=0.1"], "train.learning_rate: unknown key"),
    (["--set", "+models.linear.width=3"], "models.linear.width: unknown hyperparameter"),
    (["--set", "models.linear.hidden=0"], "models.linear.hidden"),
    (["--set", "nope"], "--set 'nope': expected key=value"),
    (["--set", "train.subset=5000"], "train.subset"),  # more than the 540 training images
    (["--set", "train.batch_size=600"], "train.batch_size"),
])
def test_cli_bad_override_fails_before_any_work(repo, fmnist, args, start):
    rc, out, err = fmnist("train", "linear", "--no-progress", *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fmnist train: error: {start}"), err
    assert not (repo / "models").exists() and not (repo / "reports").exists() and not (repo / "mlflow.db").exists()
