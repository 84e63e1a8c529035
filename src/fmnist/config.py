"""params.yaml -> typed, frozen config.

Every check of a value lives here and names the key it rejects, so a bad
params.yaml fails before any work with one line such as
``data.val_fraction: must be in (0, 1), got 1.5``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmnist import FmnistError

PARAMS_FILE = "params.yaml"

LOSSES = ("ce", "focal")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
NUM_CLASSES = 10


class ConfigError(FmnistError, ValueError):
    """A params value is wrong. The message names the key and what is allowed."""

    exit_code = 2


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
    tta_flip: bool = False  # evaluate: average predictions of the image and its mirror
    eval_batch_size: int = 1000
    device: str = "auto"
    precision: str = "auto"
    resume: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the key under `models:`, used for stage and file names
    arch: str  # registry name; defaults to `name`
    hparams: dict[str, Any]
    train: TrainConfig

    def __hash__(self) -> int:  # hparams is a dict; hash the resolved content
        return hash(json.dumps(self.as_dict(), sort_keys=True))

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "hparams": dict(self.hparams), "train": dataclasses.asdict(self.train)}


@dataclass(frozen=True)
class Config:
    seed: int
    loss: str
    data: DataConfig
    focal: FocalConfig
    train: TrainConfig
    models: tuple[str, ...]
    raw: dict[str, Any]  # the validated params, as loaded

    def model(self, name: str) -> ModelConfig:
        """The resolved config of one entry of `models:` (its `train:` overrides applied)."""
        if name not in self.models:
            raise ConfigError(f"model {name!r}: not in params.yaml `models:`; allowed: {', '.join(self.models)}")
        entry = dict(self.raw["models"][name] or {})
        arch = entry.pop("arch", name)
        overrides = entry.pop("train", None) or {}
        train = _train_config(_deep_merge(self.raw.get("train") or {}, overrides), f"models.{name}.train")
        return ModelConfig(name=name, arch=arch, hparams=entry, train=train)

    def run_params(self, name: str) -> dict[str, Any]:
        """Everything that determines one model's training, as plain values."""
        m = self.model(name)
        p: dict[str, Any] = {"seed": self.seed, "loss": self.loss, "model": m.name, **m.as_dict(),
                             "data": dataclasses.asdict(self.data)}
        del p["train"]["resume"]  # how a run is carried out, not what it computes
        if self.loss == "focal":
            p["focal"] = dataclasses.asdict(self.focal)
        return p

    def params_hash(self, name: str) -> str:
        blob = json.dumps(self.run_params(name), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes: ``lr: 1e-3`` is a number (as in YAML 1.2 and
    DVC's parser, not PyYAML's string), and a key given twice is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:  # one line: what and where, not PyYAML's multi-line report
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def load(path: str | Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate params.yaml, applying ``key=value`` overrides (as `dvc exp run -S`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from None
    raw = _yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    for item in overrides:
        raw = apply_override(raw, item)
    return validate(raw)


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """``train.lr=0.01`` -> a copy of raw with that key set. The key must already exist
    (as with `dvc exp run -S`); ``+key=value`` adds a new one."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip("+"):
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
    add = key.startswith("+")
    parts = key.lstrip("+").split(".")
    raw = copy.deepcopy(raw)
    node = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if not add:
                raise ConfigError(f"--set {item!r}: no key {'.'.join(parts[:i + 1])!r} in params.yaml "
                                  f"(use +{key} to add one); allowed: {', '.join(sorted(map(str, node)))}")
            node[part] = {}
        node = node[part]
    if parts[-1] not in node and not add:
        raise ConfigError(f"--set {item!r}: no key {key!r} in params.yaml (use +{key} to add one); "
                          f"allowed: {', '.join(sorted(map(str, node)))}")
    node[parts[-1]] = _yaml(value, f"--set {item!r}") if value.strip() else None
    return raw


def validate(raw: dict[str, Any]) -> Config:
    _known(raw, {"seed", "loss", "data", "focal", "train", "models"}, "")
    seed = _int(raw.get("seed", 42), "seed", lo=0)
    loss = _choice(raw.get("loss", "ce"), "loss", LOSSES)
    d = _section(raw, "data")
    _known(d, {f.name for f in dataclasses.fields(DataConfig)}, "data.")
    val_fraction = _float(d.get("val_fraction", 0.1), "data.val_fraction")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
    focal = _focal(_section(raw, "focal"))
    train = _train_config(_section(raw, "train"), "train")
    models = _section(raw, "models")
    if not models:
        raise ConfigError("models: must list at least one architecture")
    cfg = Config(seed=seed, loss=loss, data=DataConfig(val_fraction), focal=focal, train=train,
                 models=tuple(models), raw=raw)
    from fmnist import models as registry  # torch-free import of the registry's names

    for name in cfg.models:
        entry = models[name]
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"models.{name}: must be a mapping of hyperparameters, got {entry!r}")
        arch = (entry or {}).get("arch", name)
        registry.check_hparams(arch, {k: v for k, v in (entry or {}).items() if k not in ("arch", "train")},
                               f"models.{name}")
        cfg.model(name)  # validates the model's train overrides
    return cfg


# --------------------------------------------------------------------------- checks

def _train_config(t: dict[str, Any], prefix: str) -> TrainConfig:
    if not isinstance(t, dict):
        raise ConfigError(f"{prefix}: must be a mapping, got {t!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    _known(t, set(fields), prefix + ".")
    k = lambda name: f"{prefix}.{name}"  # noqa: E731
    dflt = TrainConfig()
    g = lambda name: t.get(name, getattr(dflt, name))  # noqa: E731
    a = t.get("augment") or {}
    if not isinstance(a, dict):
        raise ConfigError(f"{k('augment')}: must be a mapping with keys flip, shift, erase")
    _known(a, {"flip", "shift", "erase"}, k("augment") + ".")
    augment = AugmentConfig(
        flip=_bool(a.get("flip", False), k("augment.flip")),
        shift=_int(a.get("shift", 0), k("augment.shift"), lo=0, hi=8),
        erase=_prob(a.get("erase", 0.0), k("augment.erase")),
    )
    cfg = TrainConfig(
        epochs=_int(g("epochs"), k("epochs"), lo=1),
        batch_size=_int(g("batch_size"), k("batch_size"), lo=1),
        optimizer=_choice(g("optimizer"), k("optimizer"), OPTIMIZERS),
        lr=_positive(g("lr"), k("lr")),
        momentum=_prob(g("momentum"), k("momentum")),
        nesterov=_bool(g("nesterov"), k("nesterov")),
        weight_decay=_nonneg(g("weight_decay"), k("weight_decay")),
        schedule=_choice(g("schedule"), k("schedule"), SCHEDULES),
        step_size=_int(g("step_size"), k("step_size"), lo=1),
        step_gamma=_positive(g("step_gamma"), k("step_gamma")),
        label_smoothing=_float(g("label_smoothing"), k("label_smoothing")),
        patience=_int(g("patience"), k("patience"), lo=0),
        subset=_int(g("subset"), k("subset"), lo=0),
        augment=augment,
        tta_flip=_bool(g("tta_flip"), k("tta_flip")),
        eval_batch_size=_int(g("eval_batch_size"), k("eval_batch_size"), lo=1),
        device=_choice(g("device"), k("device"), DEVICES),
        precision=_choice(g("precision"), k("precision"), PRECISIONS),
        resume=_bool(g("resume"), k("resume")),
    )
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"{k('label_smoothing')}: must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise ConfigError(f"{k('nesterov')}: needs optimizer sgd with momentum > 0")
    if cfg.subset and cfg.subset < NUM_CLASSES:
        raise ConfigError(f"{k('subset')}: must be 0 (all) or at least {NUM_CLASSES}, got {cfg.subset}")
    return cfg


def _focal(f: dict[str, Any]) -> FocalConfig:
    _known(f, {"gamma", "alpha"}, "focal.")
    gamma = _nonneg(f.get("gamma", 2.0), "focal.gamma")
    alpha = f.get("alpha", 1.0)
    if isinstance(alpha, list):
        if len(alpha) != NUM_CLASSES:
            raise ConfigError(f"focal.alpha: a list must have one weight per class ({NUM_CLASSES}), got {len(alpha)}")
        alpha = tuple(_nonneg(a, f"focal.alpha[{i}]") for i, a in enumerate(alpha))
    else:
        alpha = _nonneg(alpha, "focal.alpha")
    return FocalConfig(gamma=gamma, alpha=alpha)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, got {value!r}")
    return value


def _known(d: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _int(v: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: must be {rng}, got {v}")
    return v


def _float(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    return float(v)


def _positive(v: Any, key: str) -> float:
    v = _float(v, key)
    if not v > 0:
        raise ConfigError(f"{key}: must be > 0, got {v}")
    return v


def _nonneg(v: Any, key: str) -> float:
    v = _float(v, key)
    if v < 0:
        raise ConfigError(f"{key}: must be >= 0, got {v}")
    return v


def _prob(v: Any, key: str) -> float:
    v = _float(v, key)
    if not 0 <= v <= 1:
        raise ConfigError(f"{key}: must be in [0, 1], got {v}")
    return v


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
