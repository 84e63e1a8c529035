"""One model's run, settled once: the run spec.

A ``RunSpec`` holds everything that decides how one model of params.yaml is trained and
evaluated (architecture and hyperparameters, checked against the registry here; seed, loss,
training and evaluation settings), the hash of what decides its weights, and every path its
stages read and write. Commands resolve it once (``load``) and pass it on; the train stage
stores it in the checkpoint, and evaluate and predict read it back from there.
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
                   resume=Path("models") / f"{model}.resume.pt", history=train / "history.csv",
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
        blob = json.dumps(self.trained_with(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

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
                "params_hash": self.params_hash}

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
                   paths=RunPaths(**{k: Path(v) for k, v in d["paths"].items()}), recipe=d["recipe"],
                   fallback=d["fallback"], published=d["published"], assumed=tuple(d["assumed"]),
                   own_section=d["own_section"], own_train_keys=tuple(d["own_train_keys"]))


def resolve(params: Params) -> dict[str, RunSpec]:
    """Every model's run spec, in params.yaml's order; each model's hyperparameters are checked
    against the registry, so a bad one fails here, before any work."""
    from fmnist.core import models as registry

    specs = {}
    for name, entry in params.models.items():
        registry.check_hparams(entry.arch, entry.hparams, f"models.{name}")
        specs[name] = RunSpec(model=name, arch=entry.arch, hparams=entry.hparams, seed=params.seed,
                              loss=params.loss, focal=params.focal if params.loss == "focal" else None,
                              data=params.data, train=entry.train, evaluate=entry.evaluate,
                              paths=RunPaths.of(name), recipe=entry.recipe,
                              fallback=params.recipe == "published" and entry.recipe != "published",
                              published=entry.published, assumed=entry.assumed, own_section=entry.own_section,
                              own_train_keys=entry.own_train_keys)
    return specs


def load(path: str | Path = config.PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, RunSpec]:
    return resolve(config.load(path, overrides))


def pick(specs: dict[str, RunSpec], name: str) -> RunSpec:
    if name not in specs:
        raise ConfigError(f"model {name!r}: not in params.yaml `models:`; allowed: {', '.join(specs)}")
    return specs[name]
