"""The register stage: the model chosen on validation (not on the test set) becomes a version of the
MLflow registered model and its `champion` when its validation accuracy beats the current one's;
reports/champion.json records it; the dvc.yaml stage that runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO, specs
from fmnist import checkpoint
from fmnist.commands import register, report
from fmnist.tracking import registry
from reliability_helpers import make_repo
from test_report import fake_eval

MODELS = ("linear", "mlp")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A repository where linear and mlp were trained (one epoch each) into its own MLflow store,
    each run with its MLflow Model: the runs a registration needs."""
    from conftest import write_raw
    from fmnist import config
    from fmnist.commands import preprocess, train

    tmp = tmp_path_factory.mktemp("register")
    processed = tmp / "processed"
    preprocess.run(config.load(REPO / "params.yaml"), raw=write_raw(tmp / "raw"), out=processed)
    root = make_repo(tmp / "repo", processed)
    raw = yaml.safe_load((root / "params.yaml").read_text())  # these two models, one short epoch each
    raw["models"] = {n: raw["models"][n] for n in MODELS}
    raw["evaluate"]["models"] = {n: v for n, v in raw["evaluate"]["models"].items() if n in MODELS}
    raw["train"].update(epochs=1, batch_size=64)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
            m.delenv(var, raising=False)
        m.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        m.setenv("TQDM_DISABLE", "1")
        for spec in specs().values():
            train.run(spec, progress=False)
    return root


@pytest.fixture
def ws(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained repository, with a registry of its own (its copy of mlflow.db)."""
    root = tmp_path / "ws"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    return root


def two() -> dict:
    return specs()


def run_id(model: str) -> str:
    return checkpoint.read(Path("models") / f"{model}.pt")[0].run_id


def client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def champion(root: Path):
    return client(root).get_model_version_by_alias(registry.REGISTERED_MODEL, registry.ALIAS)


def test_the_validation_winner_is_the_reports_best_and_the_champion(ws, fmnist):
    # linear is the more accurate on the test set, mlp on validation: mlp is chosen, everywhere
    fake_eval("linear", 0.90, 0.80, 0.50)
    fake_eval("mlp", 0.80, 0.85, 0.40)
    md = report.run(two()).read_text()
    assert "Best model: **mlp**" in md

    rc, out, err = fmnist("register")
    assert rc == 0, err
    record = json.loads(register.CHAMPION.read_text())
    assert json.loads(out) == record
    [v] = client(ws).search_model_versions(f"name = '{registry.REGISTERED_MODEL}'")
    assert v.run_id == run_id("mlp") and champion(ws).version == v.version
    assert (v.tags["val_accuracy"], v.tags["test_accuracy"], v.tags["model"]) == ("0.85", "0.8", "mlp")
    assert record == {"model": "mlp", "run_id": run_id("mlp"), "registered_model": "fashion-mnist",
                      "version": str(v.version), "alias": "champion", "alias_moved": True,
                      "alias_version": str(v.version), "chosen_on": "val_accuracy", "val_accuracy": 0.85,
                      "val_nll": 0.40, "test_accuracy": 0.80, "tracking_store": "sqlite"}

    rc, _, err = fmnist("register")  # the same inputs again: nothing new in the store
    assert rc == 0, err
    again = json.loads(register.CHAMPION.read_text())
    assert len(client(ws).search_model_versions(f"name = '{registry.REGISTERED_MODEL}'")) == 1
    assert (again["version"], again["alias_moved"], again["alias_version"]) == (record["version"], False,
                                                                              record["version"])

    # linear becomes the better on validation (its test accuracy is unchanged): it takes the alias
    fake_eval("linear", 0.90, 0.86, 0.50)
    assert register.run(two())["model"] == "linear"
    assert champion(ws).run_id == run_id("linear")


def test_the_champion_moves_only_on_a_higher_validation_accuracy(ws):
    linear, mlp = run_id("linear"), run_id("mlp")
    first = registry.register_champion(linear, 0.80, {"model": "linear"}, test_accuracy=0.70)
    assert first.new and first.moved and first.previous is None
    tie = registry.register_champion(mlp, 0.80, {"model": "mlp"}, test_accuracy=0.99)  # a better test figure
    assert tie.new and not tie.moved and tie.alias_version == first.version
    better = registry.register_champion(mlp, 0.81, {"model": "mlp"})
    assert not better.new and better.moved and better.previous == first.version
    assert str(champion(ws).version) == better.version
    assert champion(ws).tags["val_accuracy"] == "0.81"  # a version keeps the figures of its latest registration
    worse = registry.register_champion(linear, 0.805, {"model": "linear"}, test_accuracy=0.999)
    assert not worse.moved and champion(ws).run_id == mlp


def test_a_champion_chosen_on_the_test_set_before_gives_way_to_one_chosen_on_validation(ws, monkeypatch):
    """A version registered before the rule changed has only a test_accuracy tag: not comparable with
    a validation accuracy, so the first candidate chosen on validation replaces it."""
    c = client(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")  # for mlflow.register_model
    c.create_registered_model(registry.REGISTERED_MODEL)
    old = mlflow.register_model(registry.logged_model_uri(run_id("linear"), c), registry.REGISTERED_MODEL,
                                tags={"model": "linear", "test_accuracy": "0.99"})
    c.set_registered_model_alias(registry.REGISTERED_MODEL, registry.ALIAS, old.version)
    new = registry.register_champion(run_id("mlp"), 0.5, {"model": "mlp"}, test_accuracy=0.5)
    assert new.moved and new.previous == str(old.version)
    assert champion(ws).run_id == run_id("mlp")


def test_a_run_that_is_not_in_the_store_fails_in_one_line_and_records_nothing(ws, tmp_path, fmnist, monkeypatch):
    fake_eval("linear", 0.90, 0.80, 0.50)
    fake_eval("mlp", 0.80, 0.85, 0.40)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")  # not where mlp was trained
    rc, _, err = fmnist("register")
    assert rc == 1
    [line] = [x for x in err.splitlines() if "error" in x.lower()]  # MLflow may log the new store's creation
    assert line.startswith(f"fmnist register: error: the run that trained mlp ({run_id('mlp')}) is not in sqlite:///")
    assert "MLFLOW_TRACKING_URI" in line and "Traceback" not in err
    assert not register.CHAMPION.exists()

    Path("reports/eval/linear/metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))  # before validation
    rc, _, err = fmnist("register")
    assert rc == 1 and "reports/eval/linear/metrics.json: no number 'val_accuracy'; run `dvc repro`" in err


def test_dvc_yaml_register_stage_reads_exactly_its_inputs_and_keeps_the_run_cache():
    """DVC 3.67 keeps no run-cache for a stage with a plain output marked cache: false; a metric is exempt."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = list(dvc["stages"])
    assert stages.index("register") == stages.index("report") + 1
    stage = dvc["stages"]["register"]
    assert stage["cmd"] == "fmnist register"
    assert {"reports/eval", "models", "src/fmnist/selection.py", "src/fmnist/tracking",
            "src/fmnist/commands/register.py"} <= set(stage["deps"])
    assert not {"reports/report.md", "reports/train", "data/processed"} & set(stage["deps"])  # it reads none
    assert stage["params"] == ["loss", "recipe", "models"]
    assert "outs" not in stage
    assert stage["metrics"] == [{str(register.CHAMPION): {"cache": False}}]
