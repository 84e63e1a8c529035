"""Levers on a conv net's training step, each measured against the step as the core runs it, side by
side in one process: the variants take turns, a few steps each, round after round, so that the noise
of a shared machine falls on all of them alike; each variant's images/s is the median of its rounds.

    python -m benchmarks.levers                 # every conv net, every lever (about 5 minutes on 2 cores)
    python -m benchmarks.levers --only fmnet

Variants (each changes one thing from ``as trained``):

- ``flush denormals``: ``torch.set_flush_denormal(True)`` (tiny floats computed as 0)
- ``AdamW foreach`` / ``AdamW fused``: the optimizer's multi-tensor and fused CPU kernels
- ``fp32``: no bf16 autocast (where the model trains in bf16)
- ``NCHW``: the default memory format instead of channels-last
- ``batch x2``: twice the params.yaml batch size (images/s; what it does to accuracy is another question)
- ``1 thread``: ``torch.set_num_threads(1)``
- ``no dropout``: dropout layers removed, to see what they cost (not a change the seed models can take)
- ``torch masks``: torch's own ``nn.Dropout`` (a ``bernoulli_`` draw per element) instead of the
  core's ``models.Dropout`` (16-bit slices of 64-bit random words)
- ``torch Flatten``: torch's own ``nn.Flatten`` (its gradient back in NCHW) instead of the core's
  ``models.Flatten`` (the gradient back in channels-last, as the layer's input)
"""

from __future__ import annotations

if __name__ == "__main__":  # as every fmnist command runs: under tcmalloc where the machine has it
    from fmnist import allocator

    allocator.use_tcmalloc()

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fmnist.core import models
from fmnist.data.loader import Split, Stats
from fmnist.runspec import RunSpec

CONV_NETS = ("tinyvgg", "fashionnet", "cnn_bn", "fmnet")
VARIANTS = ("as trained", "flush denormals", "AdamW foreach", "AdamW fused", "fp32", "NCHW", "batch x2",
            "1 thread", "no dropout", "torch masks", "torch Flatten")
CHUNK, ROUNDS, WARMUP = 4, 5, 3


@dataclass
class Setup:
    step: Callable[[torch.Tensor, torch.Tensor], None]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    flush_denormal: bool = False
    threads: int | None = None


def _replace(model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``model`` with each layer of type ``kind`` replaced by ``make(layer)``, at any depth."""
    for name, child in model.named_children():
        if isinstance(child, kind):
            setattr(model, name, make(child))
        else:
            _replace(child, kind, make)
    return model


def _without_dropout(model: nn.Module) -> nn.Module:
    return _replace(model, nn.modules.dropout._DropoutNd, lambda d: nn.Identity())


def _with_torch_masks(model: nn.Module) -> nn.Module:
    """The core's ``models.Dropout`` layers made torch's own ``nn.Dropout``."""
    return _replace(model, models.Dropout, lambda d: nn.Dropout(d.p))


def _with_torch_flatten(model: nn.Module) -> nn.Module:
    """The core's ``models.Flatten`` layers made torch's own ``nn.Flatten``."""
    return _replace(model, models.Flatten, lambda f: nn.Flatten(f.start_dim, f.end_dim))


def setup(spec: RunSpec, variant: str, train: Split, stats: Stats) -> Setup:
    from benchmarks.peak import prepare

    tc = spec.train
    kind = {"AdamW foreach": {"foreach": True}, "AdamW fused": {"fused": True}}.get(variant)

    def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **kind)

    optimizer = adamw if kind and tc.optimizer == "adamw" else None
    swap = {"no dropout": _without_dropout, "torch masks": _with_torch_masks,
            "torch Flatten": _with_torch_flatten}.get(variant)
    model = swap(models.build(spec.arch, spec.hparams)) if swap else None
    p = prepare(spec, train, stats, WARMUP + CHUNK * ROUNDS, model=model, fp32=variant == "fp32",
                nchw=variant == "NCHW", batch_size=tc.batch_size * 2 if variant == "batch x2" else None,
                optimizer=optimizer)
    return Setup(p.step, p.batches, flush_denormal=variant == "flush denormals",
                 threads=1 if variant == "1 thread" else None)


def measure(spec: RunSpec, train: Split, stats: Stats, variants: tuple[str, ...] = VARIANTS) -> dict:
    """images/s per variant (median over rounds) and its ratio to ``as trained``."""
    threads = torch.get_num_threads()
    setups = {v: setup(spec, v, train, stats) for v in variants}
    for s in setups.values():
        for x, y in s.batches[:WARMUP]:
            s.step(x, y)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(ROUNDS):
        for v, s in setups.items():
            chunk = s.batches[WARMUP + r * CHUNK: WARMUP + (r + 1) * CHUNK]
            torch.set_flush_denormal(s.flush_denormal)
            torch.set_num_threads(s.threads or threads)
            t = time.perf_counter()
            for x, y in chunk:
                s.step(x, y)
            rates[v].append(sum(len(y) for _, y in chunk) / (time.perf_counter() - t))
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
    ips = {v: statistics.median(r) for v, r in rates.items()}
    base = ips["as trained"]
    return {"model": spec.model, "batch_size": spec.train.batch_size,
            "images_per_s": {v: round(i) for v, i in ips.items()},
            "ratio": {v: round(i / base, 2) for v, i in ips.items()}}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import emit, ensure_raw, load_data, machine
    from fmnist import runspec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(CONV_NETS), help="comma-separated models")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    specs = runspec.load(args.params)
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(specs):
        ap.error(f"--only: not in params.yaml's models: {', '.join(sorted(unknown))}")
    train, _, stats = load_data(ensure_raw())
    emit(machine())
    for name in chosen:
        emit(measure(specs[name], train, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
