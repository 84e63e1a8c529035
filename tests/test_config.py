"""params.yaml -> typed, frozen config: the file read as DVC reads it, `--set` as `dvc exp run -S`
applies it, every setting written in the file (the code has no defaults), every bad or missing
value exits 2 with one line naming its key, before any work; a model's own `train:` overrides."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, write_raw
from fmnist import ConfigError, cli, config, params, runspec

BASE = params.read(REPO / "params.yaml")
SECTIONS = {"data": config.DataConfig, "focal": config.FocalConfig, "train": config.TrainConfig,
            "train.augment": config.AugmentConfig, "evaluate": config.EvalConfig}


def with_value(key: str, value: Any) -> dict[str, Any]:
    """A copy of the repository's params with one dotted key set (created if absent)."""
    raw = copy.deepcopy(BASE)
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def write_params(folder: Path, raw: dict[str, Any] | str) -> Path:
    path = folder / "params.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path




# --------------------------------------------------------------------------- the good file

def test_repository_params_load_typed_and_frozen():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.seed == 42 and cfg.loss == "ce" and cfg.data.val_fraction == 0.1
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)
    assert cfg.focal == config.FocalConfig(gamma=2.0, alpha=1.0)
    assert (cfg.train.nproc, cfg.train.sync_bn) == (1, False)
    assert tuple(cfg.models) == tuple(BASE["models"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    for name, spec in runspec.load(REPO / "params.yaml").items():
        assert spec.arch == name


def dig(raw: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        raw = raw[part]
    return raw


def test_params_yaml_is_the_one_source_of_every_setting():
    """Every field of the config classes has its value in the committed params.yaml, and none has a
    default in the code that could disagree with it."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name in dig(BASE, section), f"{section}.{f.name}: not in params.yaml"
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
                f"{cls.__name__}.{f.name} has a default in the code; params.yaml is the one source")
    assert set(config.TOP_LEVEL) == set(BASE)
    cfg = config.load(REPO / "params.yaml")
    for section in SECTIONS:  # and what the code reads is what the file says, key by key
        read = dataclasses.asdict(operator.attrgetter(section)(cfg))
        assert read == {k: v for k, v in dig(BASE, section).items() if k != "models"}


SHARED_KEYS = ["seed", "loss", "recipe"] + [
    f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("key", SHARED_KEYS)
def test_a_missing_setting_is_an_error_naming_it(tmp_path, key):
    raw = copy.deepcopy(BASE)
    parent, _, last = key.rpartition(".")
    del (dig(raw, parent) if parent else raw)[last]
    with pytest.raises(ConfigError) as e:
        runspec.load(write_params(tmp_path, raw))
    assert str(e.value).startswith(f"{key}: missing; params.yaml sets every setting") and e.value.exit_code == 2


def test_a_model_sets_only_the_keys_it_changes():
    """models.M.train and evaluate.models.M override some keys; the rest come from the shared sections."""
    specs = runspec.load(REPO / "params.yaml")
    assert set(BASE["models"]["fmnet"]["train"]) < {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert specs["fmnet"].train.weight_decay == config.load(REPO / "params.yaml").train.weight_decay


# --------------------------------------------------------------------------- read as DVC reads it

TRICKY = """\
switch: on
answer: yes
octal: 010
sexagesimal: 1:30
lr: 1e-3
big: .inf
nested:
  when: Off
  hexa: 0x1f
"""
TRICKY_SETS = ["lr=0.01", "switch=yes", "+added=010", "nested.when=1:30", "big=-inf", "+nested.rate=2e-4"]


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested keys joined with dots, as `dvc params diff` shows them."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_tricky_values_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2, as DVC's own loader (ruamel.yaml) reads the file: not PyYAML's YAML 1.1."""
    from dvc.dependency.param import read_param_file
    from dvc.fs import LocalFileSystem

    path = tmp_path / "params.yaml"
    path.write_text(TRICKY)
    ours = params.read(path)
    assert ours == read_param_file(LocalFileSystem(), str(path))
    assert ours == {"switch": "on", "answer": "yes", "octal": 10, "sexagesimal": "1:30", "lr": 0.001,
                    "big": math.inf, "nested": {"when": "Off", "hexa": 31}}
    assert yaml.safe_load(TRICKY)["switch"] is True  # what the old YAML 1.1 reading gave


def test_set_and_the_file_mean_what_dvc_exp_run_and_dvc_params_diff_say(tmp_path):
    """In a scratch git + DVC repository: `dvc exp run -S` rewrites params.yaml, `dvc params diff`
    reads the file before (old) and after (new); fmnist reads the same values, without and with --set."""
    def run(*args: str) -> str:
        res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    (tmp_path / "params.yaml").write_text(TRICKY)
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  noop:\n    cmd: {sys.executable} -c pass\n"
                                       "    params:\n      - params.yaml:\n")  # every key of the file
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "params")
    old, new = params.read(tmp_path / "params.yaml"), params.read(tmp_path / "params.yaml", TRICKY_SETS)
    run(sys.executable, "-m", "dvc", "exp", "run", "-q", *(a for s in TRICKY_SETS for a in ("-S", s)))
    diff = json.loads(run(sys.executable, "-m", "dvc", "params", "diff", "--all", "--json"))["params.yaml"]
    assert {k: v["old"] for k, v in diff.items() if v["old"] is not None} == flat(old)
    assert {k: v["new"] for k, v in diff.items()} == flat(new)
    assert (new["switch"], new["added"], new["nested"]["when"], new["big"]) == ("yes", "010", "1:30", -math.inf)


def test_yaml_1_2_numbers_and_focal_alpha_list(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("lr: 0.002", "lr: 1e-3")
    text = text.replace("alpha: 1.0 ", "alpha: [1, 1, 1, 1, 1, 1, 2.5, 1, 1, 1] ")
    cfg = config.load(write_params(tmp_path, text))
    assert cfg.train.lr == 0.001
    assert cfg.focal.alpha == (1.0,) * 6 + (2.5,) + (1.0,) * 3
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a number, got '1e-3'$"):  # quoted: a string
        config.load(write_params(tmp_path, text.replace("lr: 1e-3", 'lr: "1e-3"')))


# --------------------------------------------------------------------------- bad values

BAD = [  # (dotted key, value, key the message must start with, words it must contain)
    ("lrr", 0.1, "lrr", "unknown key; allowed: data, evaluate, focal, loss, models, recipe, seed, train"),
    ("train.tta_flip", True, "train.tta_flip", "unknown key"),  # evaluation settings live under evaluate:
    ("evaluate.tta_flip", "yes", "evaluate.tta_flip", "true or false"),
    ("evaluate.batch_size", 0, "evaluate.batch_size", ">= 1"),
    ("evaluate.flip", True, "evaluate.flip", "allowed: batch_size, tta_flip"),
    ("evaluate.models.resnet", {}, "evaluate.models.resnet", "not a model of `models:`"),
    ("evaluate.models.mlp", {"tta_flip": 1}, "evaluate.models.mlp.tta_flip", "true or false"),
    ("train.lrr", 0.1, "train.lrr", "unknown key; allowed:"),
    ("train.augment.flipp", True, "train.augment.flipp", "allowed: erase, flip, shift"),
    ("data.val_frac", 0.2, "data.val_frac", "allowed: val_fraction"),
    ("focal.beta", 1, "focal.beta", "allowed: alpha, gamma"),
    ("models.resnet9000", {}, "models.resnet9000", "unknown architecture 'resnet9000'; allowed: logistic, linear, mlp"),
    ("models.mlp", 5, "models.mlp", "must be a mapping"),
    ("models.mlp.hiddn", 5, "models.mlp.hiddn", "unknown hyperparameter of mlp; allowed: hidden"),
    ("models.mlp.hidden", 0, "models.mlp.hidden", "integer >= 1"),
    ("models.fmnet.stem", -1, "models.fmnet.stem", "integer >= 0"),  # 0 is allowed: no stem
    ("models.ffn_bn.dropout", 1.5, "models.ffn_bn.dropout", "[0, 1)"),
    ("models.fmnet.train.lrr", 0.1, "models.fmnet.train.lrr", "unknown key"),
    ("models.fmnet.train.lr", -1, "models.fmnet.train.lr", "> 0"),
    ("models.fmnet.train.augment.shift", 9, "models.fmnet.train.augment.shift", "[0, 8]"),
    ("loss", "foo", "loss", "must be one of ce, focal; got 'foo'"),
    ("recipe", "nonsense", "recipe", "must be one of project, published; got 'nonsense'"),
    ("train.input_scaling", "minmax", "train.input_scaling", "must be one of standard, unit"),
    ("models.linear.published", "sgd", "models.linear.published", "must be a mapping of train keys"),
    ("models.linear.published.lrr", 0.1, "models.linear.published.lrr", "unknown key"),
    ("models.linear.published.lr", 0, "models.linear.published.lr", "must be > 0"),
    ("models.mlp512.published.assumed", ["speed"], "models.mlp512.published.assumed", "'speed' is not a key"),
    ("train.lr", 0, "train.lr", "must be > 0, got 0"),
    ("train.lr", -0.01, "train.lr", "must be > 0"),
    ("train.lr", "fast", "train.lr", "must be a number, got 'fast'"),
    ("train.epochs", 0, "train.epochs", "must be >= 1, got 0"),
    ("train.epochs", 2.5, "train.epochs", "must be an integer"),
    ("train.epochs", True, "train.epochs", "must be an integer"),
    ("train.batch_size", None, "train.batch_size", "must be an integer"),
    ("train.optimizer", "lbfgs", "train.optimizer", "sgd, adam, adamw, rmsprop"),
    ("train.schedule", "linear", "train.schedule", "none, step, cosine, onecycle"),
    ("train.device", "tpu", "train.device", "auto, cpu, cuda"),
    ("train.nesterov", "maybe", "train.nesterov", "true or false"),
    ("train.nesterov", True, "train.nesterov", "optimizer sgd"),
    ("train.momentum", 1.5, "train.momentum", "[0, 1]"),
    ("train.weight_decay", -1e-4, "train.weight_decay", ">= 0"),
    ("train.label_smoothing", 1.0, "train.label_smoothing", "[0, 1)"),
    ("train.subset", 5, "train.subset", "at least 10"),
    ("train.augment", [1], "train.augment", "must be a mapping"),
    ("train", "fast", "train", "must be a mapping"),
    ("focal.gamma", -1, "focal.gamma", "must be >= 0, got -1"),
    ("focal.alpha", [1.0] * 9, "focal.alpha", "one weight per class (10), got 9"),
    ("focal.alpha", [1.0] * 11, "focal.alpha", "got 11"),
    ("focal.alpha", [1.0] * 9 + [-1.0], "focal.alpha[9]", ">= 0"),
    ("focal.alpha", "high", "focal.alpha", "must be a number"),
    ("data.val_fraction", 1.5, "data.val_fraction", "must be in (0, 1), got 1.5"),
    ("data.val_fraction", 0, "data.val_fraction", "must be in (0, 1), got 0"),
    ("data.val_fraction", 1, "data.val_fraction", "(0, 1)"),
    ("data.val_fraction", "0.1", "data.val_fraction", "must be a number"),
    ("data", [0.1], "data", "must be a mapping"),
    ("seed", -1, "seed", ">= 0"),
    ("seed", "abc", "seed", "must be an integer"),
    ("models", {}, "models", "at least one"),
]


@pytest.mark.parametrize("key,value,names,says", BAD, ids=[f"{k}={v!r}" for k, v, _, _ in BAD])
def test_bad_value_names_its_key(tmp_path, key, value, names, says):
    with pytest.raises(ConfigError) as e:
        runspec.load(write_params(tmp_path, with_value(key, value)))
    msg = str(e.value)
    assert msg.startswith(names + ":") and says in msg
    assert "\n" not in msg and e.value.exit_code == 2


@pytest.mark.parametrize("text,says", [
    ("- 1\n- 2\n", "must be a mapping"),
    ("seed: [1\n", "not valid YAML (line 2"),
    ("seed: 1\ntrain:\n  lr: 0.1\n  lr: 0.2\n", 'not valid YAML (line 4, column 3): found duplicate key "lr"'),
])
def test_unreadable_file_is_one_line(tmp_path, text, says):
    path = write_params(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the repository root or pass --params"):
        config.load(tmp_path / "params.yaml")


def test_unknown_model_name():
    with pytest.raises(ConfigError) as e:
        runspec.pick(runspec.load(REPO / "params.yaml"), "resnet")
    assert str(e.value).startswith("model 'resnet': not in params.yaml") and "mlp" in str(e.value)


# --------------------------------------------------------------------------- --set overrides

def test_set_overrides_existing_keys_with_hydra_values():
    cfg = config.load(REPO / "params.yaml", ["train.lr=1e-3", "loss=focal", "train.augment.flip=true",
                                             "focal.alpha=[1, 1, 1, 1, 1, 1, 3, 1, 1, 1]", "seed=7"])
    assert cfg.train.lr == 0.001 and cfg.loss == "focal" and cfg.train.augment.flip is True and cfg.seed == 7
    assert cfg.focal.alpha[6] == 3.0
    with pytest.raises(ConfigError, match=r"^train\.augment\.flip: must be true or false, got 'on'$"):
        config.load(REPO / "params.yaml", ["train.augment.flip=on"])  # a string, as in the file
    assert config.load(REPO / "params.yaml").train.lr == 0.002  # the file itself is untouched


@pytest.mark.parametrize("item,says", [
    ("train.lrr=0.1", "no key 'train.lrr' in params.yaml (use +train.lrr=0.1 to add one); allowed: augment, "),
    ("trian.lr=0.1", "no key 'trian' in params.yaml (use +trian.lr=0.1 to add one); allowed: data, evaluate,"),
    ("seed.x=1", "'seed' is a value, not a section of params.yaml"),
    ("+seed=1", "An item is already at 'seed'"),
    ("train.lr", "expected key=value as `dvc exp run -S` takes it"),
    ("=1", "expected key=value"),
    ("train.lr=[0.1", "expected key=value as `dvc exp run -S` takes it"),
    ("seed=1,2,3", "a sweep is several runs; queue them with `dvc exp run --queue -S seed=1,2,3`"),
    ("seed=range(1,4)", "`dvc exp run --queue -S seed=range(1,4)`"),
    ("loss=choice(ce,focal)", "a sweep is several runs"),
])
def test_set_rejects_missing_keys_and_bad_syntax(item, says):
    with pytest.raises(ConfigError) as e:
        config.load(REPO / "params.yaml", [item])
    assert says in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def test_set_values_are_validated_like_the_file():
    with pytest.raises(ConfigError, match=r"^train\.epochs: must be >= 1, got 0$"):
        config.load(REPO / "params.yaml", ["train.epochs=0"])


def test_plus_adds_a_key():
    path = REPO / "params.yaml"
    with pytest.raises(ConfigError, match="no key 'models.wide'"):
        config.load(path, ["models.wide.hidden=64"])
    specs = runspec.load(path, ["train.lr=0.5", "+models.wide.arch=mlp", "+models.wide.hidden=64"])
    assert tuple(specs) == (*BASE["models"], "wide")
    wide = specs["wide"]
    assert wide.arch == "mlp" and wide.hparams == {"hidden": 64} and wide.train.lr == 0.5
    with pytest.raises(ConfigError, match=r"^train\.bogus: unknown key"):  # added, then validated
        config.load(path, ["+train.bogus=1"])
    with pytest.raises(ConfigError, match=r"^train\.nproc: missing"):  # and a key taken away is missing
        config.load(path, ["~train.nproc"])


# --------------------------------------------------------------------------- a model's own train: overrides

def test_model_train_overrides_merge_over_the_shared_section():
    cfg, specs = config.load(REPO / "params.yaml"), runspec.load(REPO / "params.yaml")
    fmnet, mlp = specs["fmnet"].train, specs["mlp"].train
    assert mlp == cfg.train
    assert (fmnet.epochs, fmnet.batch_size, fmnet.lr, fmnet.label_smoothing) == (8, 256, 0.004, 0.1)
    assert specs["fmnet"].evaluate.tta_flip and not specs["mlp"].evaluate.tta_flip
    assert fmnet.augment == config.AugmentConfig(flip=True, shift=1, erase=0.0)  # erase from train.augment
    assert (fmnet.optimizer, fmnet.weight_decay, fmnet.schedule) == (cfg.train.optimizer, cfg.train.weight_decay,
                                                                     cfg.train.schedule)
    # A change to the shared section reaches every model that does not set the key itself.
    specs = runspec.load(REPO / "params.yaml", ["train.weight_decay=0.01", "train.augment.erase=0.25",
                                                "train.lr=0.1"])
    fmnet = specs["fmnet"].train
    assert fmnet.weight_decay == 0.01 and fmnet.augment == config.AugmentConfig(flip=True, shift=1, erase=0.25)
    assert fmnet.lr == 0.004 and specs["mlp"].train.lr == 0.1


def h(overrides: list[str], name: str = "mlp") -> str:
    return runspec.load(REPO / "params.yaml", overrides)[name].params_hash


def test_one_switch_trains_every_model_on_its_published_recipe():
    project, published = runspec.load(REPO / "params.yaml"), runspec.load(REPO / "params.yaml", ["recipe=published"])
    for name, spec in published.items():
        if project[name].published is None:  # no published recipe: the project's, and the report says so
            assert spec.fallback and spec.recipe == "project" and spec.train == project[name].train
            continue
        assert spec.recipe == "published" and not spec.fallback and project[name].recipe == "project"
        assert {k: getattr(spec.train, k) for k in spec.published} == spec.published  # every key as written
        assert spec.params_hash != project[name].params_hash
    course = published["tinyvgg"].train
    assert (course.optimizer, course.lr, course.momentum, course.weight_decay, course.batch_size, course.epochs,
            course.schedule, course.input_scaling) == ("sgd", 0.1, 0.0, 0.0, 32, 3, "none", "unit")
    assert published["fmnet"].fallback and "fmnet" in {n for n, s in published.items() if s.published is None}
    assert published["mlp512"].assumed and not published["linear"].assumed
    assert published["linear"].key("lr") == "models.linear.published.lr"  # errors name the key that set it


def test_params_hash_follows_what_changes_a_model():
    assert len(h([])) == 16 and h([]) == h([])
    assert h(["train.lr=0.01"]) != h([])
    assert h(["seed=1"]) != h([])
    assert h(["models.mlp.hidden=11"]) != h([])
    assert h(["models.fmnet.train.lr=0.01"]) == h([])  # another model's override
    assert h(["evaluate.tta_flip=true", "evaluate.batch_size=10"]) == h([])  # evaluation never changes weights
    assert h(["focal.gamma=3"]) == h([])  # unused under loss: ce ...
    assert h(["loss=focal", "focal.gamma=3"]) != h(["loss=focal"])  # ... used under focal
    assert h(["models.fmnet.train.lr=0.01"], "fmnet") != h([], "fmnet")


# --------------------------------------------------------------------------- through the CLI

@pytest.mark.parametrize("key,value", [("data.val_fraction", 1.5), ("train.lrr", 0.1), ("loss", "foo"),
                                       ("models.resnet9000", {}), ("extra", 1)])
def test_cli_preprocess_exits_2_before_any_work(tmp_path, monkeypatch, capsys, restore_sigterm, key, value):
    write_raw(tmp_path / "data" / "raw", n_train=60, n_test=20)  # good data: only the params are wrong
    write_params(tmp_path, with_value(key, value))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["preprocess", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fmnist preprocess: error: {key}:") and err.count("\n") == 1
    assert not (tmp_path / "data" / "processed").exists()


def test_cli_preprocess_runs_with_good_params(tmp_path, monkeypatch, capsys, restore_sigterm):
    write_raw(tmp_path / "data" / "raw", n_train=60, n_test=20)
    write_params(tmp_path, with_value("data.val_fraction", 0.5))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["preprocess", "--params", "params.yaml"]) == 0
    assert capsys.readouterr().out.strip() == "train: 30, val: 30, test: 20"


@pytest.mark.parametrize("argv,says", [
    (["train", "mlp", "--set", "train.epochs=0"], "train.epochs: must be >= 1"),
    (["train", "mlp", "--set", "train.lrr=0.1"], "no key 'train.lrr'"),
    (["train", "resnet"], "model 'resnet': not in params.yaml"),
    (["evaluate", "mlp", "--set", "loss=foo"], "loss: must be one of ce, focal"),
])
def test_cli_train_and_evaluate_exit_2_before_any_work(tmp_path, monkeypatch, capsys, restore_sigterm, argv, says):
    write_params(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fmnist {argv[0]}: error: ") and says in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no models/, reports/, mlflow.db


def test_one_version(capsys):
    """`fmnist --version` says fmnist.__version__, the number pyproject.toml takes too (no second copy)."""
    import tomllib

    import fmnist

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"fmnist {fmnist.__version__}\n"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fmnist.__version__"}
