"""params.yaml -> validated, frozen values (fmnist.params reads the file).

Every check of a value lives here and names the key it rejects, so a bad
params.yaml fails before any work with one line such as
``data.val_fraction: must be in (0, 1), got 1.5``. A model's entry under ``models:``
is merged with the shared sections here too (its ``train:`` overrides, its
``evaluate.models`` overrides); ``fmnist.runspec`` turns each into one run spec.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist import ConfigError, params
from fmnist.data import NUM_CLASSES
from fmnist.params import PARAMS_FILE

LOSSES = ("ce", "focal")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
SCALINGS = ("standard", "unit")  # standard: (x - mean) / std of the training split; unit: pixels / 255, in [0, 1]
RECIPES = ("project", "published")
TOP_LEVEL = ("seed", "loss", "recipe", "data", "focal", "train", "evaluate", "models")


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = 0.1


@dataclass(frozen=True)
class FocalConfig:
    gamma: float = 2.0
    alpha: float | tuple[float, ...] = 1.0


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = False  # random horizontal flip, p = 0.5
    shift: int = 0  # random translation by up to this many pixels
    erase: float = 0.0  # probability of random erasing per image


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 0.002
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    step_size: int = 1  # step schedule: epochs between decays
    step_gamma: float = 0.5  # step schedule: decay factor
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping on val loss; 0 = off
    subset: int = 0  # 0 = the whole training split; N = stratified subset of N images
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    input_scaling: str = "standard"
    device: str = "auto"
    precision: str = "auto"
    nproc: int = 1  # processes training together (torchrun, DistributedDataParallel)
    sync_bn: bool = False  # with nproc > 1: batch-norm statistics over every process, not each one's own


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1000
    tta_flip: bool = False  # average the predictions of the image and its mirror


@dataclass(frozen=True)
class ModelEntry:
    """One entry of ``models:`` with the shared sections merged in."""

    name: str  # the key under `models:`, used for stage and file names
    arch: str  # registry name; defaults to `name`
    hparams: dict[str, Any]
    train: TrainConfig  # what it trains with: the project's recipe or, under `recipe: published`, its source's
    evaluate: EvalConfig
    recipe: str  # the recipe `train` holds: project or published
    own_section: str  # where its own train keys are: `train` (the project's recipe) or `published`
    own_train_keys: tuple[str, ...]  # the train keys that section sets
    published: dict[str, Any] | None  # the recipe its source published, as written, if it has one
    assumed: tuple[str, ...] = ()  # keys of `published` the source did not publish (the project's choice)


@dataclass(frozen=True)
class Params:
    seed: int
    loss: str
    recipe: str  # project | published: which recipe every model trains with
    data: DataConfig
    focal: FocalConfig
    train: TrainConfig
    evaluate: EvalConfig
    models: dict[str, ModelEntry]  # in params.yaml's order


# --------------------------------------------------------------------------- loading

def load(path: str | Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml, applying ``key=value`` overrides."""
    return validate(params.read(path, overrides))


def validate(raw: dict[str, Any]) -> Params:
    _known(raw, set(TOP_LEVEL), "")
    seed = _int(raw.get("seed", 42), "seed", lo=0)
    loss = _choice(raw.get("loss", "ce"), "loss", LOSSES)
    recipe = _choice(raw.get("recipe", "project"), "recipe", RECIPES)
    d = _section(raw, "data")
    _known(d, {"val_fraction"}, "data.")
    data = DataConfig(_number(d.get("val_fraction", 0.1), "data.val_fraction", 0, 1, lo_open=True, hi_open=True))
    focal = _focal(_section(raw, "focal"))
    train = _section(raw, "train")
    evaluate = _section(raw, "evaluate")
    shared_eval = {k: v for k, v in evaluate.items() if k != "models"}
    own_eval = _section(evaluate, "models", "evaluate.models")
    entries = _section(raw, "models")
    if not entries:
        raise ConfigError("models: must list at least one architecture")
    for name in own_eval:
        if name not in entries:
            raise ConfigError(f"evaluate.models.{name}: not a model of `models:`; allowed: {', '.join(entries)}")
    return Params(seed=seed, loss=loss, recipe=recipe, data=data, focal=focal, train=_train_config(train, "train"),
                  evaluate=_eval_config(shared_eval, "evaluate"),
                  models={name: _model_entry(name, entry, recipe, train, shared_eval, own_eval.get(name))
                          for name, entry in entries.items()})


def _model_entry(name: str, entry: Any, recipe: str, train: dict[str, Any], shared_eval: dict[str, Any],
                 own_eval: Any) -> ModelEntry:
    """A model's train keys over the shared `train:` section: its own `train:` (the project's recipe)
    or, under `recipe: published`, its `published:` recipe where it has one."""
    key = f"models.{name}"
    if entry is not None and not isinstance(entry, dict):
        raise ConfigError(f"{key}: must be a mapping of hyperparameters, got {entry!r}")
    hparams = dict(entry or {})
    arch = hparams.pop("arch", name)
    own = {"train": hparams.pop("train", None) or {}, "published": hparams.pop("published", None)}
    for section, value in own.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}.{section}: must be a mapping of train keys, got {value!r}")
    if own_eval is not None and not isinstance(own_eval, dict):
        raise ConfigError(f"evaluate.models.{name}: must be a mapping, got {own_eval!r}")
    project = _train_config(_deep_merge(train, own["train"]), f"{key}.train")
    published, assumed = None, ()
    if own["published"] is not None:
        published = {k: v for k, v in own["published"].items() if k != "assumed"}
        assumed = _assumed(own["published"].get("assumed", []), published, f"{key}.published.assumed")
        published_train = _train_config(_deep_merge(train, published), f"{key}.published")
    section = "published" if recipe == "published" and published is not None else "train"
    return ModelEntry(
        name=name, arch=arch, hparams=hparams,
        train=published_train if section == "published" else project,
        evaluate=_eval_config({**shared_eval, **(own_eval or {})}, f"evaluate.models.{name}"),
        recipe="published" if section == "published" else "project", own_section=section,
        own_train_keys=tuple(own[section] if section == "train" else published), published=published,
        assumed=assumed,
    )


def _assumed(value: Any, recipe: dict[str, Any], key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of the recipe's keys, got {value!r}")
    for v in value:
        if v.split(".")[0] not in recipe:
            raise ConfigError(f"{key}: {v!r} is not a key of the recipe; allowed: {', '.join(recipe)}")
    return tuple(value)


# --------------------------------------------------------------------------- sections

def _train_config(t: dict[str, Any], prefix: str) -> TrainConfig:
    if not isinstance(t, dict):
        raise ConfigError(f"{prefix}: must be a mapping, got {t!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _known(t, fields, prefix + ".")
    defaults = TrainConfig()

    def get(name: str) -> tuple[Any, str]:
        return t.get(name, getattr(defaults, name)), f"{prefix}.{name}"

    aug = t.get("augment") or {}
    if not isinstance(aug, dict):
        raise ConfigError(f"{prefix}.augment: must be a mapping with keys flip, shift, erase")
    _known(aug, {"flip", "shift", "erase"}, f"{prefix}.augment.")
    augment = AugmentConfig(
        flip=_bool(aug.get("flip", False), f"{prefix}.augment.flip"),
        shift=_int(aug.get("shift", 0), f"{prefix}.augment.shift", lo=0, hi=8),
        erase=_number(aug.get("erase", 0.0), f"{prefix}.augment.erase", 0, 1),
    )
    cfg = TrainConfig(
        epochs=_int(*get("epochs"), lo=1),
        batch_size=_int(*get("batch_size"), lo=1),
        optimizer=_choice(*get("optimizer"), OPTIMIZERS),
        lr=_number(*get("lr"), 0, lo_open=True),
        momentum=_number(*get("momentum"), 0, 1),
        nesterov=_bool(*get("nesterov")),
        weight_decay=_number(*get("weight_decay"), 0),
        schedule=_choice(*get("schedule"), SCHEDULES),
        step_size=_int(*get("step_size"), lo=1),
        step_gamma=_number(*get("step_gamma"), 0, lo_open=True),
        label_smoothing=_number(*get("label_smoothing"), 0, 1, hi_open=True),
        patience=_int(*get("patience"), lo=0),
        subset=_int(*get("subset"), lo=0),
        augment=augment,
        input_scaling=_choice(*get("input_scaling"), SCALINGS),
        device=_choice(*get("device"), DEVICES),
        precision=_choice(*get("precision"), PRECISIONS),
        nproc=_int(*get("nproc"), lo=1),
        sync_bn=_bool(*get("sync_bn")),
    )
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise ConfigError(f"{prefix}.nesterov: needs optimizer sgd with momentum > 0")
    if cfg.subset and cfg.subset < NUM_CLASSES:
        raise ConfigError(f"{prefix}.subset: must be 0 (all) or at least {NUM_CLASSES}, got {cfg.subset}")
    return cfg


def _eval_config(e: dict[str, Any], prefix: str) -> EvalConfig:
    _known(e, {f.name for f in dataclasses.fields(EvalConfig)}, prefix + ".")
    return EvalConfig(batch_size=_int(e.get("batch_size", 1000), f"{prefix}.batch_size", lo=1),
                      tta_flip=_bool(e.get("tta_flip", False), f"{prefix}.tta_flip"))


def _focal(f: dict[str, Any]) -> FocalConfig:
    _known(f, {"gamma", "alpha"}, "focal.")
    gamma = _number(f.get("gamma", 2.0), "focal.gamma", 0)
    alpha = f.get("alpha", 1.0)
    if isinstance(alpha, list):
        if len(alpha) != NUM_CLASSES:
            raise ConfigError(f"focal.alpha: a list must have one weight per class ({NUM_CLASSES}), got {len(alpha)}")
        alpha = tuple(_number(a, f"focal.alpha[{i}]", 0) for i, a in enumerate(alpha))
    else:
        alpha = _number(alpha, "focal.alpha", 0)
    return FocalConfig(gamma=gamma, alpha=alpha)


# --------------------------------------------------------------------------- checks of one value

def _section(raw: dict[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name or key}: must be a mapping, got {value!r}")
    return value


def _known(d: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _int(v: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{key}: must be {_range(lo, hi, False, False)}, got {v}")
    return v


def _number(v: Any, key: str, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, hi_open: bool = False) -> float:
    """A number within bounds; ``lo_open``/``hi_open`` leave a bound itself out."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above:
        raise ConfigError(f"{key}: must be {_range(lo, hi, lo_open, hi_open)}, got {v}")
    return float(v)


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: must be true or false, got {v!r}")
    return v


def _choice(v: Any, key: str, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {v!r}")
    return v


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
