"""Model checkpoints: everything needed to rebuild and use a model from the file alone.

A checkpoint holds the weights, the run spec the model was trained with (so evaluate and
predict use the settings it was made with), the normalisation it expects, whether it
ran in bf16 and the temperature that calibrates its probabilities. It holds tensors and plain values only and is always read with
``weights_only=True`` (fmnist.files.torch_load): a file that would unpickle code is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fmnist import FmnistError
from fmnist.data import CLASSES
from fmnist.data.loader import Stats
from fmnist.files import torch_load, torch_save
from fmnist.runspec import RunSpec

FORMAT = 2
RETRAIN = "`dvc pull` fetches it from the DVC remote, `dvc repro` (or `fmnist train MODEL`) trains it again"


class CheckpointError(FmnistError):
    """Not a usable fmnist checkpoint. The message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    spec: RunSpec
    stats: Stats  # the normalisation the model expects
    bf16: bool  # trained (and so evaluated) under bf16 autocast
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run that trained it
    temperature: float = 1.0  # divides its log-probabilities to calibrate them (fitted on the validation split)


def save(path: str | Path, model: nn.Module, spec: RunSpec, stats: Stats, *, bf16: bool, run_id: str | None,
         temperature: float = 1.0) -> None:
    torch_save(path, {
        "format": FORMAT, "spec": spec.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "classes": list(CLASSES), "stats": {"mean": stats.mean, "std": stats.std}, "bf16": bf16,
        "mlflow_run_id": run_id, "temperature": float(temperature),
    })


def load_file(path: str | Path) -> Any:
    """Any torch file of ours (checkpoints and resume states), read safely."""
    return torch_load(path, CheckpointError, RETRAIN)


def read(path: str | Path) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint's metadata and its weights, unbuilt."""
    raw = load_file(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "state_dict" not in raw:
        raise CheckpointError(f"{path}: not an fmnist checkpoint of format {FORMAT}; {RETRAIN}")
    try:
        ck = Checkpoint(spec=RunSpec.from_dict(raw["spec"]),
                        stats=Stats(float(raw["stats"]["mean"]), float(raw["stats"]["std"])),
                        bf16=bool(raw["bf16"]), classes=tuple(raw["classes"]), run_id=raw.get("mlflow_run_id"),
                        temperature=float(raw.get("temperature", 1.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata is incomplete ({type(e).__name__}: {e}); {RETRAIN}") from e
    return ck, raw["state_dict"]


def load(path: str | Path) -> tuple[nn.Module, Checkpoint]:
    """The model (in eval mode, on the CPU) and the checkpoint's metadata."""
    from fmnist.core import models

    ck, state_dict = read(path)
    try:
        model = models.build(ck.spec.arch, ck.spec.hparams)
        model.load_state_dict(state_dict)
    except Exception as e:
        raise CheckpointError(f"{path}: does not match architecture {ck.spec.arch!r}: {e}") from e
    model.eval()
    return model, ck
