"""params.yaml -> validated, frozen values (fmnist.params reads the file).

params.yaml is the one source of every setting: each key a run reads is written there, and the
classes below have no defaults of their own, so a key missing from the file is an error naming it,
never a value the code chose. Every check of a value lives here and names the key it rejects, so
a bad params.yaml fails before any work with one line such as
``data.val_fraction: must be in (0, 1), got 1.5``. A model's entry under ``models:`` sets only the
keys it changes; ``fmnist.runspec`` merges it over the shared sections and checks the result here
(``train_config``, ``eval_config``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
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
    val_fraction: float


@dataclass(frozen=True)
class FocalConfig:
    gamma: float
    alpha: float | tuple[float, ...]


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool  # random horizontal flip, p = 0.5
    shift: int  # random translation by up to this many pixels
    erase: float  # probability of random erasing per image


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    step_size: int  # step schedule: epochs between decays
    step_gamma: float  # step schedule: decay factor
    label_smoothing: float
    patience: int  # early stopping on val loss; 0 = off
    subset: int  # 0 = the whole training split; N = stratified subset of N images
    augment: AugmentConfig
    input_scaling: str
    device: str
    precision: str
    nproc: int  # processes training together (torchrun, DistributedDataParallel)
    sync_bn: bool  # with nproc > 1: batch-norm statistics over every process, not each one's own


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int
    tta_flip: bool  # average the predictions of the image and its mirror


@dataclass(frozen=True)
class Params:
    seed: int
    loss: str
    recipe: str  # project | published: which recipe every model trains with
    data: DataConfig
    focal: FocalConfig
    train: TrainConfig  # the shared `train:` section: every model's, except the keys its entry sets
    evaluate: EvalConfig  # the shared `evaluate:` settings
    models: dict[str, dict[str, Any]]  # each entry of `models:` as written, in order (fmnist.runspec resolves it)
    evaluate_models: dict[str, dict[str, Any]]  # `evaluate.models:` a model's own evaluation settings


# --------------------------------------------------------------------------- loading

def load(path: str | Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml, applying ``key=value`` overrides."""
    return validate(params.read(path, overrides))


def validate(raw: dict[str, Any]) -> Params:
    _keys(raw, TOP_LEVEL, "")
    seed = _int(raw["seed"], "seed", lo=0)
    loss = _choice(raw["loss"], "loss", LOSSES)
    recipe = _choice(raw["recipe"], "recipe", RECIPES)
    d = _section(raw, "data")
    _keys(d, _names(DataConfig), "data.")
    data = DataConfig(_number(d["val_fraction"], "data.val_fraction", 0, 1, lo_open=True, hi_open=True))
    focal = _focal(_section(raw, "focal"))
    train = train_config(_section(raw, "train"), "train")
    evaluate = _section(raw, "evaluate")
    shared_eval = eval_config({k: v for k, v in evaluate.items() if k != "models"}, "evaluate")
    models = _section(raw, "models")
    if not models:
        raise ConfigError("models: must list at least one architecture")
    for name, entry in models.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"models.{name}: must be a mapping of hyperparameters, got {entry!r}")
    own_eval = _section(evaluate, "models", "evaluate.models")
    for name, entry in own_eval.items():
        if name not in models:
            raise ConfigError(f"evaluate.models.{name}: not a model of `models:`; allowed: {', '.join(models)}")
        if not isinstance(entry, dict):
            raise ConfigError(f"evaluate.models.{name}: must be a mapping, got {entry!r}")
    return Params(seed=seed, loss=loss, recipe=recipe, data=data, focal=focal, train=train, evaluate=shared_eval,
                  models={name: dict(entry or {}) for name, entry in models.items()}, evaluate_models=own_eval)


# --------------------------------------------------------------------------- sections

def train_config(t: dict[str, Any], prefix: str) -> TrainConfig:
    """A complete `train:` mapping (the shared section, or a model's keys merged over it), checked."""
    if not isinstance(t, dict):
        raise ConfigError(f"{prefix}: must be a mapping, got {t!r}")
    _keys(t, _names(TrainConfig), prefix + ".")

    def get(name: str) -> tuple[Any, str]:
        return t[name], f"{prefix}.{name}"

    aug = t["augment"]
    if not isinstance(aug, dict):
        raise ConfigError(f"{prefix}.augment: must be a mapping with keys {', '.join(_names(AugmentConfig))}")
    _keys(aug, _names(AugmentConfig), f"{prefix}.augment.")
    augment = AugmentConfig(
        flip=_bool(aug["flip"], f"{prefix}.augment.flip"),
        shift=_int(aug["shift"], f"{prefix}.augment.shift", lo=0, hi=8),
        erase=_number(aug["erase"], f"{prefix}.augment.erase", 0, 1),
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


def eval_config(e: dict[str, Any], prefix: str) -> EvalConfig:
    """A complete `evaluate:` mapping (the shared settings, or a model's merged over them), checked."""
    _keys(e, _names(EvalConfig), prefix + ".")
    return EvalConfig(batch_size=_int(e["batch_size"], f"{prefix}.batch_size", lo=1),
                      tta_flip=_bool(e["tta_flip"], f"{prefix}.tta_flip"))


def _focal(f: dict[str, Any]) -> FocalConfig:
    _keys(f, _names(FocalConfig), "focal.")
    gamma = _number(f["gamma"], "focal.gamma", 0)
    alpha = f["alpha"]
    if isinstance(alpha, list):
        if len(alpha) != NUM_CLASSES:
            raise ConfigError(f"focal.alpha: a list must have one weight per class ({NUM_CLASSES}), got {len(alpha)}")
        alpha = tuple(_number(a, f"focal.alpha[{i}]", 0) for i, a in enumerate(alpha))
    else:
        alpha = _number(alpha, "focal.alpha", 0)
    return FocalConfig(gamma=gamma, alpha=alpha)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged into a copy of ``base`` (a model's keys over a shared section)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- checks of one value

def _section(raw: dict[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name or key}: must be a mapping, got {value!r}")
    return value


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _keys(d: dict[str, Any], required: tuple[str, ...], prefix: str) -> None:
    """Every key of ``d`` is known, and every one is there (params.yaml sets every setting)."""
    for key in d:
        if key not in required:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(required))}")
    for key in required:
        if key not in d:
            raise ConfigError(f"{prefix}{key}: missing; params.yaml sets every setting a run reads "
                              f"(the repository's params.yaml has each key, with its meaning)")


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
