"""`fmnist compare` on a scratch SQLite MLflow store holding runs made through the MLflow client."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist import cli, tracking
from fmnist.commands import compare

from conftest import REPO

EXPERIMENT = "compare-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module (creating its schema takes seconds): runs at known start times."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(EXPERIMENT)
    other = c.create_experiment("other")

    def run(model, loss, t, metrics, status="FINISHED", experiment=exp, **tags):
        r = c.create_run(experiment, start_time=t, tags={"model": model, "loss": loss, **tags})
        for k, v in metrics.items():
            c.log_metric(r.info.run_id, k, v)
        c.set_terminated(r.info.run_id, status)
        return r.info.run_id

    m = lambda acc, loss, time: {"test_accuracy": acc, "test_loss": loss, "train_time_s": time}  # noqa: E731
    run("linear", "ce", 1000, m(0.80, 0.60, 5.0))
    run("linear", "ce", 2000, m(0.83, 0.50, 6.0))  # the latest: wins over the one above
    run("linear", "ce", 3000, m(0.99, 0.01, 1.0), status="FAILED")  # not finished: ignored
    run("linear", "ce", 4000, {"train_time_s": 2.0})  # trained, never evaluated: ignored
    run("linear", "focal", 2500, m(0.845, 0.55, 7.0), dvc_exp_name="focal-exp")
    run("tinyvgg", "ce", 1500, m(0.88, 0.35, 40.0))
    run("zzz_custom", "ce", 1200, m(0.50, 1.20, 3.0))  # not in params.yaml: listed after those that are
    run("fmnet", "focal", 1700, m(0.93, 0.21, 60.0), experiment=other)
    return uri


@pytest.fixture
def env(store, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    return tmp_path / "out"


def test_latest_finished_run_per_model_and_loss(env, capsys):
    md, png = compare.main(out=env, params=REPO / "params.yaml")
    text = md.read_text()
    assert text in capsys.readouterr().out  # printed too
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    acc = text.split("## Test accuracy")[1].split("##")[0]
    assert "| model | ce | focal |" in acc
    assert "| linear | 83.00% | **84.50%** |" in acc
    assert "| tinyvgg | 88.00% | - |" in acc
    lines = [line.split("|")[1].strip() for line in acc.splitlines() if line.startswith("| ") and "model" not in line]
    assert lines == ["linear", "tinyvgg", "zzz_custom"]  # params.yaml's order, then the others
    assert "| linear | **0.5000** | 0.5500 |" in text  # test loss and time: the lower one is the better
    assert "| linear | **6.0** | 7.0 |" in text
    assert "99.00%" not in text and "fmnet" not in text  # the failed run, the other experiment


def test_filters_by_experiment_and_tag(env):
    md, _ = compare.main(tags=["dvc_exp_name=focal-exp"], out=env, params=REPO / "params.yaml")
    text = md.read_text()
    assert "| linear | 84.50% |" in text and "tinyvgg" not in text and "| model | focal |" in text

    md, _ = compare.main(experiment="other", out=env, params=REPO / "params.yaml")
    assert "| fmnet | 93.00% |" in md.read_text()


def test_clear_errors(env, capsys):
    with pytest.raises(tracking.TrackingError, match="no MLflow experiment 'nope'.*compare-test"):
        compare.main(experiment="nope", out=env)
    with pytest.raises(compare.CompareError, match="no FINISHED run with test metrics"):
        compare.main(tags=["dvc_exp_name=none-such"], out=env)
    with pytest.raises(compare.CompareError, match="expected KEY=VALUE"):
        compare.parse_tags(["model"])
    assert cli.main(["compare", "--experiment", "nope", "--out", str(env)]) == 1
    assert capsys.readouterr().err.startswith("fmnist compare: error: no MLflow experiment 'nope'")
    assert not env.exists()
