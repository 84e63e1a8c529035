"""The training core shared by every model: fit, predict, evaluate, early stopping.

Read ``fit`` first: one epoch is ``train_epoch`` (the six calls of every PyTorch loop) then
``validate``, then the early-stopping rule. No file I/O, no tracking and no printing here, and no
choice of device or precision: the caller passes them. ``fit`` hands each finished epoch's row and
the whole training state (all that ``resume=`` needs) to ``on_epoch``; the train stage decides what
to print, write and log.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fmnist import ConfigError, FmnistError
from fmnist.config import TrainConfig
from fmnist.core import calibration
from fmnist.core.device import autocast
from fmnist.core.distributed import Group
from fmnist.core.losses import LossFn, cross_entropy
from fmnist.core.metrics import score
from fmnist.core.models import data_initialised, uses_channels_last
from fmnist.data import NUM_CLASSES
from fmnist.data.loader import BatchLoader, Split, Stats


class TrainingDiverged(FmnistError, FloatingPointError):
    """The training loss became NaN or infinite."""


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

VAL_BATCH = 1000  # images per forward pass when scoring; the result does not depend on it


@torch.no_grad()
def predict(model: nn.Module, split: Split, stats: Stats, *, batch_size: int = VAL_BATCH,
            device: torch.device | str = "cpu", bf16: bool = False, tta_flip: bool = False) -> torch.Tensor:
    """Log-probabilities (N, 10), float32, in the split's order."""
    device = torch.device(device)
    model.eval()
    out = []
    for x, _, _ in BatchLoader(split, batch_size, stats, device=device, channels_last=uses_channels_last(model)):
        with autocast(device, bf16):
            logp = torch.log_softmax(model(x).float(), dim=1)
            if tta_flip:  # average the probabilities of the image and its mirror
                logp_f = torch.log_softmax(model(x.flip(3)).float(), dim=1)
                logp = torch.logaddexp(logp, logp_f) - math.log(2)
        out.append(logp.float().cpu())
    return torch.cat(out) if out else torch.empty(0, NUM_CLASSES)


def evaluate(model: nn.Module, split: Split, stats: Stats, **kwargs: Any) -> dict[str, float]:
    return score(predict(model, split, stats, **kwargs), split.labels)


def fit_temperature(model: nn.Module, val: Split, stats: Stats, **kwargs: Any) -> float:
    """The temperature that calibrates the model's probabilities on the validation split, scored as
    ``predict(**kwargs)`` scores it (flip test-time augmentation included)."""
    return calibration.fit_temperature(predict(model, val, stats, **kwargs), val.labels)


# --------------------------------------------------------------------------- fit

@dataclass
class TrainState:
    """Where a run stands after its last finished epoch (besides weights, optimiser and RNGs)."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # kept only with early stopping
    bad_epochs: int = 0  # epochs since the validation loss last improved
    train_time_s: float = 0.0  # the training loops alone: no validation, no I/O


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int  # the epoch whose weights the model holds: the best one with early stopping, else the last
    train_time_s: float
    stopped_early: bool
    bf16: bool
    images_per_s: float


EpochCallback = Callable[[dict[str, float], dict[str, Any]], None]  # (the epoch's row, the state to resume from)
Progress = Callable[[Iterable, int], Iterable]  # (batches, epoch) -> the same batches, shown as they go


def fit(model: nn.Module, train: Split, val: Split | None, stats: Stats, cfg: TrainConfig, loss_fn: LossFn, *,
        seed: int, device: torch.device = torch.device("cpu"), bf16: bool = False,
        on_epoch: EpochCallback | None = None, resume: dict[str, Any] | None = None,
        progress: Progress | None = None, group: Group | None = None) -> FitResult:
    """Train ``model`` in place on ``device`` (under bf16 autocast if ``bf16``) and return its history.

    Each epoch: train on every batch, validate, record, decide whether to stop. ``val`` may be
    None (the benchmarks train on all 60,000 images): then nothing is validated and early stopping
    is refused. ``on_epoch(row, state)`` is called after every epoch with the whole training state:
    ``resume=state`` continues from there to the result an uninterrupted run gives. With a process
    ``group`` (torchrun), each rank trains on its slice of every batch, in step.
    """
    if val is None and cfg.patience:
        raise ConfigError("train.patience: early stopping needs a validation split")
    channels_last = uses_channels_last(model) and device.type == "cpu"
    model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    data_rng = torch.Generator().manual_seed(seed)  # batch order and augmentation; weights use torch's own
    a = cfg.augment
    batches = BatchLoader(train, cfg.batch_size, stats, shuffle=True, generator=data_rng, flip=a.flip,
                          shift=a.shift, erase=a.erase, device=device, channels_last=channels_last, group=group)
    if resume is None:
        init_from_data(model, train, stats, device)
    trainee = _data_parallel(model, group, cfg.sync_bn, device)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, len(batches))
    state = TrainState() if resume is None else _restore(resume, model, opt, sched, data_rng)
    elapsed0 = state.history[-1]["elapsed_s"] if state.history else 0.0
    t_start = time.perf_counter()

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if _early_stop(state, cfg.patience):
            break
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss, acc = train_epoch(trainee, progress(batches, epoch) if progress else batches, opt, sched, loss_fn,
                                device, bf16, group)
        state.train_time_s += time.perf_counter() - t0
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss} in epoch {epoch}; lower train.lr or use another "
                                   "schedule")
        v = validate(model, val, stats, device, bf16, group)
        row = {"epoch": epoch, "train_loss": loss, "train_accuracy": acc, "val_loss": v["loss"],
               "val_accuracy": v["accuracy"], "lr": lr,
               "elapsed_s": round(elapsed0 + time.perf_counter() - t_start, 3)}
        _record(state, row, model, keep_best=cfg.patience > 0)
        if on_epoch is not None:
            on_epoch(row, _snapshot(state, model, opt, sched, data_rng))

    if cfg.patience and state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    seen = len(train) * len(state.history)
    return FitResult(history=state.history, best_epoch=state.best_epoch if cfg.patience else state.epoch,
                     train_time_s=state.train_time_s,
                     stopped_early=_early_stop(state, cfg.patience) and state.epoch < cfg.epochs, bf16=bf16,
                     images_per_s=seen / state.train_time_s if state.train_time_s > 0 else 0.0)


def train_epoch(model: nn.Module, batches: Iterable, opt: torch.optim.Optimizer, sched, loss_fn: LossFn,
                device: torch.device, bf16: bool, group: Group | None = None) -> tuple[float, float]:
    """One pass over the batches: the mean training loss and accuracy over every image (of every rank)."""
    model.train()
    # Kept per batch and reduced once per epoch: one tensor call per step, not five.
    losses, weights, preds, targets = [], [], [], []
    for x, y, n_global in batches:
        with autocast(device, bf16):
            out = model(x)
        if group is None:  # the batch mean
            loss, weight = loss_fn(out, y), len(y)
        else:  # this rank's sum, scaled so that DDP's averaging of gradients gives the global batch mean
            loss, weight = loss_fn(out, y, reduction="sum") * (group.world / n_global), n_global / group.world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
        weights.append(weight)
        preds.append(out.detach().argmax(1))
        targets.append(y)
    loss_sum = (torch.stack(losses) * torch.tensor(weights, device=device)).sum()
    totals = torch.tensor([float(loss_sum), float((torch.cat(preds) == torch.cat(targets)).sum()),
                           float(sum(len(t) for t in targets))], dtype=torch.float64)
    if group is not None:
        group.sum(totals)
    return float(totals[0]) / float(totals[2]), float(totals[1]) / float(totals[2])


def validate(model: nn.Module, val: Split | None, stats: Stats, device: torch.device, bf16: bool,
             group: Group | None = None) -> dict[str, float]:
    """Loss and accuracy on the validation split; in a group, each rank scores its share and the sums
    are added up, so every rank gets the exact figures for the whole split."""
    if val is None:
        return {"loss": math.nan, "accuracy": math.nan}
    if group is None:
        return evaluate(model, val, stats, device=device, bf16=bf16)
    part = val.take(torch.arange(len(val))[group.shard(len(val))])
    logp = predict(model, part, stats, device=device, bf16=bf16)
    totals = group.sum(torch.tensor([cross_entropy(logp, part.labels, reduction="sum").item(),
                                     float((logp.argmax(1) == part.labels).sum()), float(len(part))],
                                    dtype=torch.float64))
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}


INIT_IMAGES = 5000  # the first training images, in the split's order, that set a model's data-initialised layers


def init_from_data(model: nn.Module, train: Split, stats: Stats, device: torch.device) -> None:
    """Set the layers computed from the training images (fmnet's whitening), as the model will see
    them: normalised, not augmented. The same images on every rank of a group."""
    layers = data_initialised(model)
    if layers:
        images = next(iter(BatchLoader(train, INIT_IMAGES, stats, device=device)))[0]
        for layer in layers:
            layer.init_from(images)


def _data_parallel(model: nn.Module, group: Group | None, sync_bn: bool, device: torch.device) -> nn.Module:
    """What trains: the model itself, or in a group the model wrapped for DistributedDataParallel
    (batch-norm statistics per process unless ``sync_bn``)."""
    if group is None:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else group.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _early_stop(state: TrainState, patience: int) -> bool:
    """The one early-stopping rule: ``patience`` epochs in a row without a lower validation loss."""
    return patience > 0 and state.bad_epochs >= patience


def _record(state: TrainState, row: dict[str, float], model: nn.Module, keep_best: bool) -> None:
    state.epoch = int(row["epoch"])
    state.history.append(row)
    if row["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.bad_epochs = row["val_loss"], state.epoch, 0
        if keep_best:
            state.best_weights = copy.deepcopy(model.state_dict())
    else:
        state.bad_epochs += 1


def _snapshot(state: TrainState, model: nn.Module, opt, sched, data_rng: torch.Generator) -> dict[str, Any]:
    return {"state": dataclasses.asdict(state), "model": copy.deepcopy(model.state_dict()),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
            "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state()}


def _restore(snapshot: dict[str, Any], model: nn.Module, opt, sched, data_rng: torch.Generator) -> TrainState:
    model.load_state_dict(snapshot["model"])
    opt.load_state_dict(snapshot["optimizer"])
    if sched is not None:
        sched.load_state_dict(snapshot["scheduler"])
    data_rng.set_state(snapshot["data_rng"])
    torch.set_rng_state(snapshot["torch_rng"])
    state = TrainState(**snapshot["state"])
    state.history = list(state.history)
    return state
