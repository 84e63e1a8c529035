"""One model's run, settled once: the run spec.

A ``RunSpec`` holds everything that decides how one model of params.yaml is trained and
evaluated (architecture and hyperparameters, checked against the registry here; seed, loss,
training and evaluation settings: the model's own keys merged over the shared sections), the
hash of what decides its weights, and every path its stages read and write. Commands resolve
it once (``load``) and pass it on; the train stage stores it in the checkpoint, and evaluate
and predict read it back from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmnist import ConfigError, config
from fmnist.config import AugmentConfig, DataConfig, EvalConfig, FocalConfig, Params, TrainConfig
from fmnist.data import PROCESSED_DIR


@dataclass(frozen=True)
class RunPaths:
    """Every file one model's stages read or write, relative to the repository root."""

    processed: Path  # the folder of train.pt, val.pt, test.pt, stats.json
    model: Path
    resume: Path
    history: Path
    train_metrics: Path
    eval_metrics: Path
    per_class: Path
    predictions: Path
    calibration: Path

    @classmethod
    def of(cls, model: str, processed: str | Path = PROCESSED_DIR) -> RunPaths:
        train, evaluate = Path("reports/train") / model, Path("reports/eval") / model
        return cls(processed=Path(processed), model=Path("models") / f"{model}.pt",
                   resume=Path(".fmnist/resume") / f"{model}.pt", history=train / "history.csv",
                   train_metrics=train / "metrics.json", eval_metrics=evaluate / "metrics.json",
                   per_class=evaluate / "per_class.json", predictions=evaluate / "predictions.csv",
                   calibration=evaluate / "calibration.csv")

    def outputs(self) -> tuple[Path, ...]:
        return tuple(p for f, p in dataclasses.asdict(self).items() if f != "processed")


@dataclass(frozen=True)
class RunSpec:
    model: str  # the key under `models:`
    arch: str  # the registry name
    hparams: dict[str, Any]
    seed: int
    loss: str
    focal: FocalConfig | None  # None unless loss is focal
    data: DataConfig
    train: TrainConfig
    evaluate: EvalConfig
    paths: RunPaths
    recipe: str = "project"  # the recipe `train` holds: project, or published (its source's)
    fallback: bool = False  # the published recipe was asked for, but the model has none
    published: dict[str, Any] | None = None  # the recipe its source published, as params.yaml writes it
    assumed: tuple[str, ...] = ()  # the keys of `published` the source did not publish
    own_section: str = "train"  # models.<model>.<own_section> holds the train keys the model sets itself
    own_train_keys: tuple[str, ...] = ()

    @property
    def cell(self) -> str:
        """Everything that defines the run except its seed, short: model/loss/recipe/hash of the rest,
        e.g. ``fmnet/ce/project/1a2b3c4d``. Runs that differ only in seed share it."""
        return f"{self.model}/{self.loss}/{self.recipe}/{_digest(self.trained_with(), 8, 'seed')}"

    @property
    def pair_key(self) -> str:
        """The cell without the loss and its focal settings: a ce run and a focal run of the same
        model, recipe and settings share it, e.g. ``fmnet/project/5e6f7a8b``."""
        return f"{self.model}/{self.recipe}/{_digest(self.trained_with(), 8, 'seed', 'loss', 'focal')}"

    def trained_with(self) -> dict[str, Any]:
        """What decides the trained weights, as plain values (hashed; logged to MLflow)."""
        out = {"model": self.model, "arch": self.arch, "hparams": dict(self.hparams), "seed": self.seed,
               "loss": self.loss, "recipe": self.recipe, "data": dataclasses.asdict(self.data),
               "train": dataclasses.asdict(self.train)}
        if self.focal is not None:
            out["focal"] = dataclasses.asdict(self.focal)
        return out

    @property
    def params_hash(self) -> str:
        return _digest(self.trained_with(), 16)

    def key(self, train_field: str) -> str:
        """The params.yaml key that sets ``train.<train_field>`` for this model."""
        own = train_field.split(".")[0] in self.own_train_keys
        return f"models.{self.model}.{self.own_section}.{train_field}" if own else f"train.{train_field}"

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (a checkpoint is loaded with weights_only=True)."""
        return {**self.trained_with(), "focal": dataclasses.asdict(self.focal) if self.focal else None,
                "evaluate": dataclasses.asdict(self.evaluate),
                "paths": {k: str(v) for k, v in dataclasses.asdict(self.paths).items()},
                "fallback": self.fallback, "published": self.published, "assumed": list(self.assumed),
                "own_section": self.own_section, "own_train_keys": list(self.own_train_keys),
                "params_hash": self.params_hash, "cell": self.cell, "pair_key": self.pair_key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        train = dict(d["train"])
        train["augment"] = AugmentConfig(**train["augment"])
        focal = d.get("focal")
        if focal is not None and isinstance(focal["alpha"], list):
            focal = {**focal, "alpha": tuple(focal["alpha"])}
        return cls(model=d["model"], arch=d["arch"], hparams=dict(d["hparams"]), seed=d["seed"], loss=d["loss"],
                   focal=FocalConfig(**focal) if focal else None, data=DataConfig(**d["data"]),
                   train=TrainConfig(**train), evaluate=EvalConfig(**d["evaluate"]),
                   paths=RunPaths.of(d["model"], d["paths"]["processed"]), recipe=d["recipe"],  # derived: old files load too
                   fallback=d["fallback"], published=d["published"], assumed=tuple(d["assumed"]),
                   own_section=d["own_section"], own_train_keys=tuple(d["own_train_keys"]))


def _digest(values: dict[str, Any], n: int, *leave_out: str) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``values`` less the keys ``leave_out``."""
    blob = json.dumps({k: v for k, v in values.items() if k not in leave_out}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def resolve(params: Params) -> dict[str, RunSpec]:
    """Every model's run spec, in params.yaml's order: its entry of `models:` over the shared sections,
    checked (its hyperparameters against the registry), so a bad one fails here, before any work."""
    return {name: _resolve_one(params, name) for name in params.models}


def _resolve_one(params: Params, name: str) -> RunSpec:
    """One entry of `models:` over the shared sections: its own `train:` (the project's recipe) or,
    under `recipe: published`, its `published:` recipe where it has one; `evaluate.models.<name>`
    over the shared `evaluate:`."""
    from fmnist.core import models as registry

    key = f"models.{name}"
    hparams = dict(params.models[name])
    arch = hparams.pop("arch", name)
    own = {"train": hparams.pop("train", None) or {}, "published": hparams.pop("published", None)}
    for section, value in own.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}.{section}: must be a mapping of train keys, got {value!r}")
    registry.check_hparams(arch, hparams, key)
    shared = dataclasses.asdict(params.train)
    train = config.train_config(config.merged(shared, own["train"]), f"{key}.train")
    section, published, assumed = "train", None, ()
    if own["published"] is not None:
        published = {k: v for k, v in own["published"].items() if k != "assumed"}
        assumed = _assumed(own["published"].get("assumed", []), published, f"{key}.published.assumed")
        published_train = config.train_config(config.merged(shared, published), f"{key}.published")
        if params.recipe == "published":
            section, train = "published", published_train
    evaluate = {**dataclasses.asdict(params.evaluate), **params.evaluate_models.get(name, {})}
    return RunSpec(model=name, arch=arch, hparams=hparams, seed=params.seed, loss=params.loss,
                   focal=params.focal if params.loss == "focal" else None, data=params.data, train=train,
                   evaluate=config.eval_config(evaluate, f"evaluate.models.{name}"), paths=RunPaths.of(name),
                   recipe="published" if section == "published" else "project",
                   fallback=params.recipe == "published" and section != "published", published=published,
                   assumed=assumed, own_section=section,
                   own_train_keys=tuple(own["train"] if section == "train" else published))


def _assumed(value: Any, recipe: dict[str, Any], key: str) -> tuple[str, ...]:
    """`published.assumed`: the keys of the recipe its source did not publish (the project's choice)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of the recipe's keys, got {value!r}")
    for v in value:
        if v.split(".")[0] not in recipe:
            raise ConfigError(f"{key}: {v!r} is not a key of the recipe; allowed: {', '.join(recipe)}")
    return tuple(value)


def load(path: str | Path = config.PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, RunSpec]:
    return resolve(config.load(path, overrides))


def pick(specs: dict[str, RunSpec], name: str) -> RunSpec:
    if name not in specs:
        raise ConfigError(f"model {name!r}: not in params.yaml `models:`; allowed: {', '.join(specs)}")
    return specs[name]
