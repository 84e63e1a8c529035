"""The run spec: one model's run resolved once from params.yaml, stored whole in the checkpoint, and
read back by evaluate and predict."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import REPO, make_spec, specs
from fmnist import checkpoint, runspec
from fmnist.commands import predict
from fmnist.core import engine, models
from fmnist.data.loader import Stats
from fmnist.runspec import RunPaths, RunSpec

PARAMS = REPO / "params.yaml"


def test_every_spec_survives_the_round_trip_through_plain_values():
    every = {**specs(params=PARAMS), "focal": specs("loss=focal", "focal.alpha=[1, 1, 1, 1, 1, 1, 2, 1, 1, 1]",
                                                    params=PARAMS)["mlp"]}
    for spec in every.values():
        plain = spec.to_dict()
        assert RunSpec.from_dict(plain) == spec
        assert plain["params_hash"] == spec.params_hash
    assert every["focal"].focal.alpha[6] == 2.0 and every["mlp"].focal is None


def test_paths_name_every_file_of_a_model():
    p = RunPaths.of("tinyvgg")
    assert (p.model, p.resume) == (Path("models/tinyvgg.pt"), Path(".fmnist/resume/tinyvgg.pt"))
    assert (p.history, p.train_metrics) == (Path("reports/train/tinyvgg/history.csv"),
                                            Path("reports/train/tinyvgg/metrics.json"))
    assert (p.eval_metrics, p.per_class, p.predictions) == (
        Path("reports/eval/tinyvgg/metrics.json"), Path("reports/eval/tinyvgg/per_class.json"),
        Path("reports/eval/tinyvgg/predictions.csv"))
    assert p.calibration == Path("reports/eval/tinyvgg/calibration.csv")
    assert p.processed == Path("data/processed") and p.processed not in p.outputs() and len(p.outputs()) == 8


def test_key_names_the_params_yaml_key_that_set_a_value():
    s = specs(params=PARAMS)
    assert s["fmnet"].key("epochs") == "models.fmnet.train.epochs"
    assert s["fmnet"].key("augment.shift") == "models.fmnet.train.augment.shift"
    assert s["fmnet"].key("weight_decay") == "train.weight_decay"
    assert s["mlp"].key("epochs") == "train.epochs"


def test_a_model_evaluates_with_its_own_settings_over_the_shared_ones():
    s = specs(params=PARAMS)
    assert s["fmnet"].evaluate.tta_flip and not s["mlp"].evaluate.tta_flip
    s = specs("evaluate.tta_flip=true", "evaluate.batch_size=500", params=PARAMS)
    assert all(spec.evaluate.tta_flip and spec.evaluate.batch_size == 500 for spec in s.values())


def test_predict_uses_the_settings_the_checkpoint_holds(tmp_path, monkeypatch):
    """Not today's params.yaml: the file carries how its model is used."""
    from PIL import Image

    seen = []
    real = engine.predict
    monkeypatch.setattr(engine, "predict", lambda *a, **k: seen.append(k) or real(*a, **k))
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    for tta in (True, False):
        spec = make_spec("linear")
        spec = RunSpec.from_dict({**spec.to_dict(), "evaluate": {"batch_size": 7, "tta_flip": tta}})
        path = tmp_path / f"linear-{tta}.pt"
        torch.manual_seed(0)
        checkpoint.save(path, models.build("linear"), spec, Stats(0.3, 0.3), bf16=False, run_id=None)
        predict.predict(path, [tmp_path / "x.png"])
        assert seen[-1]["tta_flip"] is tta and seen[-1]["bf16"] is False


def test_resolve_checks_hyperparameters_against_the_registry():
    import pytest

    from fmnist import ConfigError, config

    raw = config.params.read(PARAMS, ["+models.wide.arch=mlp512", "+models.wide.hiddn=3"])
    with pytest.raises(ConfigError, match=r"^models\.wide\.hiddn: unknown hyperparameter of mlp512"):
        runspec.resolve(config.validate(raw))


def test_cell_names_everything_but_the_seed():
    base = specs(params=PARAMS)
    assert base["fmnet"].cell.startswith("fmnet/ce/project/") and len(base["fmnet"].cell.rsplit("/", 1)[1]) == 8
    assert len({s.cell for s in base.values()}) == len(base)  # one cell per model
    for seed in ("seed=1", "seed=7"):  # the seeds of one cell
        assert specs(seed, params=PARAMS)["fmnet"].cell == base["fmnet"].cell
    for change, model in (("train.lr=0.01", "mlp512"), ("train.weight_decay=0.01", "fmnet"),
                          ("models.fmnet.train.epochs=9", "fmnet"), ("models.fmnet.stem=8", "fmnet"),
                          ("data.val_fraction=0.2", "mlp512"), ("recipe=published", "mlp512"),
                          ("loss=focal", "mlp512"), ("train.augment.erase=0.1", "fmnet")):
        assert specs(change, params=PARAMS)[model].cell != base[model].cell, change
    focal = specs("loss=focal", params=PARAMS)["fmnet"]
    assert focal.cell.startswith("fmnet/focal/project/")
    assert specs("loss=focal", "focal.gamma=1", params=PARAMS)["fmnet"].cell != focal.cell
    assert specs("evaluate.tta_flip=false", params=PARAMS)["fmnet"].cell == base["fmnet"].cell  # not training
    assert specs("recipe=published", params=PARAMS)["linear"].cell.startswith("linear/ce/published/")


def test_pair_key_joins_the_ce_and_focal_runs_of_one_setting():
    ce, focal = specs(params=PARAMS)["fmnet"], specs("loss=focal", "focal.gamma=1", "seed=3", params=PARAMS)["fmnet"]
    assert ce.pair_key == focal.pair_key and ce.cell != focal.cell
    assert ce.pair_key.startswith("fmnet/project/") and len(ce.pair_key.rsplit("/", 1)[1]) == 8
    assert specs("train.weight_decay=0.01", params=PARAMS)["fmnet"].pair_key != ce.pair_key
    assert specs("recipe=published", params=PARAMS)["mlp"].pair_key != specs(params=PARAMS)["mlp"].pair_key
    assert RunSpec.from_dict(ce.to_dict()).cell == ce.to_dict()["cell"] == ce.cell  # stored with the checkpoint
