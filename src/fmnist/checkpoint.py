"""Model checkpoints: everything needed to rebuild and use a model from the file alone.

Loading always uses ``torch.load(..., weights_only=True)``: a checkpoint is
plain tensors, numbers and strings, and a file that tries to unpickle anything
else (code, say) is refused before it runs.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmnist import FmnistError
from fmnist.atomic import torch_save
from fmnist.data import CLASSES
from fmnist.data.loader import Stats

FORMAT = 1


class CheckpointError(FmnistError):
    """Not a usable fmnist checkpoint. The message names the file."""


def save(path: str | Path, model: nn.Module, *, name: str, arch: str, hparams: dict[str, Any], stats: Stats,
         params: dict[str, Any], params_hash: str, run_id: str | None, bf16: bool) -> None:
    torch_save(path, {
        "format": FORMAT, "model": name, "arch": arch, "hparams": dict(hparams),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "classes": list(CLASSES), "stats": {"mean": stats.mean, "std": stats.std},
        "params": params, "params_hash": params_hash, "mlflow_run_id": run_id, "bf16": bf16,
    })


def load_file(path: str | Path) -> dict[str, Any]:
    """Read any torch file of ours safely (checkpoints and resume states)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; train it with `dvc repro` or `fmnist train MODEL`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:  # torch's own text advises weights_only=False: name the culprit
            unsafe = re.search(r"GLOBAL (\S+)", text)
            what = f"it would call {unsafe.group(1)}" if unsafe else "it holds objects other than tensors"
            raise CheckpointError(f"{path}: refused: {what}, which could run code when loaded. fmnist "
                                  "checkpoints hold only tensors and plain values; use files whose origin you "
                                  "trust.") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {text[:200]}); "
                              "it may be truncated: re-run `dvc repro` to rebuild it") from None


def load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model (in eval mode, on the CPU) and the checkpoint's metadata."""
    from fmnist import models

    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an fmnist checkpoint (format {FORMAT})")
    try:
        model = models.build(ckpt["arch"], ckpt["hparams"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise CheckpointError(f"{path}: does not match architecture {ckpt.get('arch')!r}: {e}") from None
    model.eval()
    return model, ckpt


def stats_of(ckpt: dict[str, Any]) -> Stats:
    return Stats(float(ckpt["stats"]["mean"]), float(ckpt["stats"]["std"]))
