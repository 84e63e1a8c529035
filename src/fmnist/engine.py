"""The training core shared by every model: fit, evaluate, early stopping.

No file I/O and no tracking here: ``fit`` reports each finished epoch to a
callback, with a way to snapshot the whole training state, and the train stage
decides what to write and what to log.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fmnist import FmnistError
from fmnist.config import ConfigError, TrainConfig
from fmnist.data.loader import BatchLoader, Split, Stats
from fmnist.losses import LossFn, cross_entropy
from fmnist.models import uses_channels_last, worth_bf16


class TrainingDiverged(FmnistError, FloatingPointError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- device and precision

def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: is cuda but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX or AVX-512 BF16). Elsewhere
    bf16 is emulated and slower than fp32, so ``precision: auto`` stays in fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - probe missing on some builds
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    except OSError:
        return False


def use_bf16(precision: str, device: torch.device, model: nn.Module | None = None) -> bool:
    """``auto`` means bf16 where the hardware has it and, given ``model``, where it pays."""
    if precision == "fp32":
        return False
    supported = (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16())
    if precision == "bf16" and not supported:
        raise ConfigError(f"train.precision: is bf16 but this {device.type.upper()} has no native bf16; "
                           "use auto or fp32")
    if precision == "auto" and model is not None and not worth_bf16(model):
        return False
    return supported


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed the global RNG (weight init, dropout). Data order and augmentation use
    their own generator, seeded in ``fit``."""
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimisers and schedules

def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Every schedule steps once per batch, so all of them are smooth and resumable."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.step_gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.25, anneal_strategy="linear",
                                                   cycle_momentum=cfg.optimizer in ("sgd", "rmsprop"))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, split: Split, stats: Stats, *, batch_size: int = 1000,
            device: torch.device | str = "cpu", bf16: bool = False, tta_flip: bool = False) -> torch.Tensor:
    """Log-probabilities (N, 10), float32, in the split's order."""
    device = torch.device(device)
    model.eval()
    cl = uses_channels_last(model)
    out = []
    for x, _ in BatchLoader(split, batch_size, stats, device=device, channels_last=cl):
        with autocast(device, bf16):
            logp = torch.log_softmax(model(x).float(), dim=1)
            if tta_flip:  # average the probabilities of the image and its mirror
                logp_f = torch.log_softmax(model(x.flip(3)).float(), dim=1)
                logp = torch.logaddexp(logp, logp_f) - math.log(2)
        out.append(logp.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


def score(logp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Exact accuracy and cross-entropy over every sample (not a mean of batch means)."""
    n = len(labels)
    nll = cross_entropy(logp, labels, reduction="sum").item() / n
    acc = (logp.argmax(1) == labels).sum().item() / n
    return {"loss": nll, "accuracy": acc}


def evaluate(model: nn.Module, split: Split, stats: Stats, **kwargs: Any) -> dict[str, float]:
    return score(predict(model, split, stats, **kwargs), split.labels)


# --------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    train_time_s: float  # the training loop only: no validation, no I/O
    stopped_early: bool
    bf16: bool
    images_per_s: float = field(init=False)
    n_train: int = 0

    def __post_init__(self) -> None:
        seen = self.n_train * len(self.history)
        self.images_per_s = seen / self.train_time_s if self.train_time_s > 0 else 0.0


EpochCallback = Callable[[dict[str, float], Callable[[], dict[str, Any]]], None]


def fit(model: nn.Module, train: Split, val: Split | None, stats: Stats, cfg: TrainConfig, loss_fn: LossFn, *,
        seed: int, device: torch.device | None = None, on_epoch: EpochCallback | None = None,
        resume: dict[str, Any] | None = None, progress: bool = True) -> FitResult:
    """Train ``model`` in place; return the per-epoch history.

    ``val`` may be None (the benchmarks train on all 60,000 images): then no validation
    runs and early stopping is refused. ``on_epoch(row, snapshot)`` is called after every epoch; ``snapshot()``
    returns everything needed to resume from that point (``resume=``), giving
    the same final result as an uninterrupted run.
    """
    from tqdm.auto import tqdm

    if val is None and cfg.patience:
        raise ConfigError("train.patience: early stopping needs a validation split")
    device = device or select_device(cfg.device)
    bf16 = use_bf16(cfg.precision, device, model)
    channels_last = uses_channels_last(model) and device.type == "cpu"
    model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    loader = BatchLoader(train, cfg.batch_size, stats, shuffle=True, generator=g, flip=a.flip, shift=a.shift,
                         erase=a.erase, device=device, channels_last=channels_last)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, len(loader))
    eval_kw = dict(batch_size=cfg.eval_batch_size, device=device, bf16=bf16)

    history: list[dict[str, float]] = []
    best = {"val_loss": math.inf, "epoch": 0, "model": None}
    bad_epochs, train_time, start_epoch = 0, 0.0, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None:
            sched.load_state_dict(resume["scheduler"])
        g.set_state(resume["data_rng"])
        torch.set_rng_state(resume["torch_rng"])
        history, best, bad_epochs = list(resume["history"]), dict(resume["best"]), resume["bad_epochs"]
        train_time, start_epoch = resume["train_time_s"], resume["epoch"] + 1
    # A run saved in the epoch that triggered early stopping resumes as stopped.
    stopped = bool(cfg.patience) and bad_epochs >= cfg.patience and start_epoch <= cfg.epochs
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    t_start = time.perf_counter()

    def snapshot(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "model": copy.deepcopy(model.state_dict()), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "data_rng": g.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                "bad_epochs": bad_epochs, "train_time_s": train_time}

    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        model.train()
        # Kept per batch and reduced once per epoch: one tensor call per step, not five.
        batch_losses, preds, targets = [], [], []
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress,
                   mininterval=0.5, unit="batch")
        for x, y in bar:
            with autocast(device, bf16):
                out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            batch_losses.append(loss.detach())
            preds.append(out.detach().argmax(1))
            targets.append(y)
        train_time += time.perf_counter() - t0
        sizes = torch.tensor([len(t) for t in targets], device=device)
        seen = int(sizes.sum())
        train_loss = float((torch.stack(batch_losses) * sizes).sum()) / seen
        train_acc = float((torch.cat(preds) == torch.cat(targets)).sum()) / seen
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}; "
                                   "lower train.lr or use another schedule")
        v = evaluate(model, val, stats, **eval_kw) if val is not None else {"loss": math.nan, "accuracy": math.nan}
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": v["loss"], "val_accuracy": v["accuracy"], "lr": lr,
               "elapsed_s": round(elapsed0 + time.perf_counter() - t_start, 3)}
        history.append(row)
        if v["loss"] < best["val_loss"]:
            best = {"val_loss": v["loss"], "epoch": epoch,
                    "model": copy.deepcopy(model.state_dict()) if cfg.patience else None}
            bad_epochs = 0
        else:
            bad_epochs += 1
            stopped = bool(cfg.patience) and bad_epochs >= cfg.patience and epoch < cfg.epochs
        if progress:
            tqdm.write(f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                       f"train_acc {row['train_accuracy']:.4f}  val_loss {row['val_loss']:.4f}  "
                       f"val_acc {row['val_accuracy']:.4f}  lr {lr:.3g}  {train_time:.1f}s"
                       + ("  (early stop)" if stopped else ""))
        if on_epoch is not None:
            on_epoch(row, lambda e=epoch: snapshot(e))

    if cfg.patience and best["model"] is not None:
        model.load_state_dict(best["model"])
    return FitResult(history=history, best_epoch=best["epoch"], train_time_s=train_time,
                     stopped_early=stopped, bf16=bf16, n_train=len(train))
