"""How close each model's training comes to what this machine can do, and what torch.compile buys.

- ``peak``: the machine's peak, a large matmul timed in fp32 (and in bf16 where the CPU has it) in
  this run; for every model of params.yaml, the FLOPs of one training image (forward and backward, counted by
  ``torch.utils.flop_counter``) times its measured training throughput, as a fraction of that peak;
  and for the conv nets, their convolutions alone (each layer's forward and backward on its own
  input shape, nothing else of the step): the most a step could reach with every other operator free.
- ``compile``: torch.compile's compile time, cold (an empty inductor cache) and warm (the cache of
  the cold run, as ``TORCHINDUCTOR_FX_GRAPH_CACHE`` keeps it between runs), and its training
  throughput against eager mode, for the conv nets, in the precision each trains in; each in a
  fresh process.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fmnist.core import device, engine, losses, models
from fmnist.data.loader import BatchLoader, Split, Stats
from fmnist.runspec import RunSpec

MATMUL = 2048
STEPS = 25  # timed training steps per model, after WARMUP
WARMUP = 5
COMPILED = ("tinyvgg", "fashionnet", "cnn_bn", "fmnet")


def peak_gflops(dtype: torch.dtype, n: int = MATMUL, repeat: int = 10, trials: int = 3) -> float:
    """The best of ``trials`` timings of ``repeat`` products: a peak is what the machine can do, and
    on a shared machine a single timing moves by a fifth from one minute to the next."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e9)
    return best


def _step_fn(spec: RunSpec, model: nn.Module, bf16: bool, opt: torch.optim.Optimizer | None = None):
    """The core's training step (forward in the model's precision, the loss, backward, the optimizer's
    step), with the params' optimizer unless ``opt`` is given."""
    loss_fn = losses.make_loss(spec.loss, spec.focal, spec.train.label_smoothing)
    opt = opt or engine.make_optimizer(model, spec.train)
    dev = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with device.autocast(dev, bf16):
            out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


@dataclass
class Prepared:
    step: Callable[[torch.Tensor, torch.Tensor], None]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    bf16: bool
    channels_last: bool


def prepare(spec: RunSpec, train: Split, stats: Stats, n_batches: int, *, model: nn.Module | None = None,
            fp32: bool = False, nchw: bool = False, batch_size: int | None = None,
            optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None) -> Prepared:
    """A model's training step as the core runs it, on ``n_batches`` real training batches (as many
    epochs as that takes); the keywords change one thing each, for benchmarks.levers."""
    engine.seed_everything(0)
    model = model if model is not None else models.build(spec.arch, spec.hparams)
    bf16 = device.use_bf16(spec.train.precision, torch.device("cpu"), model) and not fp32
    cl = models.uses_channels_last(model) and not nchw
    model = (model.to(memory_format=torch.channels_last) if cl else model).train()
    step = _step_fn(spec, model, bf16, optimizer(model) if optimizer else None)
    loader = BatchLoader(train, batch_size or spec.train.batch_size, stats, shuffle=True,
                         generator=torch.Generator(), channels_last=cl)
    epochs = itertools.chain.from_iterable(itertools.repeat(loader))
    return Prepared(step, [(x, y) for x, y, _ in itertools.islice(epochs, n_batches)], bf16, cl)


def flops_per_image(spec: RunSpec, batch: int = 64) -> float:
    """Forward and backward FLOPs of one training image (FlopCounterMode counts matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build(spec.arch, spec.hparams).train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        losses.make_loss(spec.loss, spec.focal)(model(x), y).backward()
    return counter.get_total_flops() / batch


def training_throughput(spec: RunSpec, train: Split, stats: Stats) -> tuple[float, bool]:
    """Images per second of the core's training step on this model's batch size, and whether in bf16."""
    p = prepare(spec, train, stats, WARMUP + STEPS)
    for x, y in p.batches[:WARMUP]:
        p.step(x, y)
    t0 = time.perf_counter()
    for x, y in p.batches[WARMUP:]:
        p.step(x, y)
    return sum(len(y) for _, y in p.batches[WARMUP:]) / (time.perf_counter() - t0), p.bf16


def convolutions_alone(spec: RunSpec, bf16: bool, repeat: int = 20) -> tuple[float, float] | None:
    """The FLOPs and seconds of one step's convolutions alone (None if the model has none): each conv
    layer's forward and backward (the gradients the step computes: none into a frozen weight or into
    the image), at the model's batch size, precision and memory format, timed ``repeat`` times after
    a warm-up, summed over layers."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = models.build(spec.arch, spec.hparams).train()
    if not models.uses_channels_last(model):  # no conv layer
        return None
    model = model.to(memory_format=torch.channels_last)  # as the core trains a conv net on the CPU
    inputs: list[tuple[nn.Conv2d, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with device.autocast(torch.device("cpu"), bf16):
        model(torch.randn(spec.train.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    seconds = flops = 0.0
    for conv, seen in inputs:
        x = seen.detach().requires_grad_(seen.requires_grad)
        with device.autocast(torch.device("cpu"), bf16):
            y = conv(x)
        grad = torch.ones_like(y) if y.requires_grad else None  # a frozen conv on the image: forward only

        def fwd_bwd() -> None:
            conv.zero_grad(set_to_none=True)  # as the step does: gradients written, not accumulated
            x.grad = None
            with device.autocast(torch.device("cpu"), bf16):
                out = conv(x)
            if grad is not None:
                out.backward(grad)
        for _ in range(3):
            fwd_bwd()
        with FlopCounterMode(display=False) as counter:
            fwd_bwd()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fwd_bwd()
        seconds += (time.perf_counter() - t0) / repeat
        flops += counter.get_total_flops()
    return flops, seconds


def peak_report(specs: dict[str, RunSpec], train: Split, stats: Stats) -> list[dict]:
    # Without bf16 in hardware a bf16 matmul is emulated (about 1 GFLOP/s on 2 AVX2 cores: minutes for
    # one 2048x2048 product) and no model trains in bf16 there (precision: auto), so it is not timed.
    native = device.cpu_has_native_bf16()
    peak = {"fp32": peak_gflops(torch.float32), **({"bf16": peak_gflops(torch.bfloat16)} if native else {})}
    rows = []
    for name, spec in specs.items():
        ips, bf16 = training_throughput(spec, train, stats)
        flops = flops_per_image(spec)
        achieved = flops * ips / 1e9
        kind = "bf16" if bf16 else "fp32"
        row = {"model": name, "batch_size": spec.train.batch_size, "precision": kind,
               "mflop_per_image": round(flops / 1e6, 2), "images_per_s": round(ips),
               "gflop_per_s": round(achieved, 1), "fraction_of_peak": round(achieved / peak[kind], 3)}
        convs = convolutions_alone(spec, bf16)
        if convs is not None:
            rate = convs[0] / convs[1] / 1e9
            row["convolutions_alone"] = {"gflop_per_s": round(rate, 1), "fraction_of_peak": round(rate / peak[kind], 3)}
        rows.append(row)
    return [{"peak_gflop_per_s": {k: round(v, 1) for k, v in peak.items()}, "matmul": f"{MATMUL}x{MATMUL}",
             **({} if native else {"bf16": "not timed: no native bf16 on this CPU"})}, *rows]


# --------------------------------------------------------------------------- torch.compile, in fresh processes

def compile_report(specs: dict[str, RunSpec]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
        for name in COMPILED:
            if name not in specs:
                continue
            runs = {}
            for kind in ("eager", "cold", "warm"):
                res = subprocess.run([sys.executable, "-m", "benchmarks.peak", name, kind], env=env,
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"torch.compile of {name} ({kind}) failed:\n{res.stderr[-2000:]}")
                runs[kind] = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"model": name, "precision": runs["eager"]["precision"], "compile_s_cold": runs["cold"]["first_step_s"],
                         "compile_s_warm": runs["warm"]["first_step_s"],
                         "images_per_s_eager": runs["eager"]["images_per_s"],
                         "images_per_s_compiled": runs["warm"]["images_per_s"],
                         "compiled_over_eager": round(runs["warm"]["images_per_s"] / runs["eager"]["images_per_s"], 2)})
    return rows


def _compile_one(name: str, kind: str) -> None:
    """One process: the model's first training step (compiling, unless eager) and its throughput."""
    from fmnist import runspec

    spec = runspec.load()[name]
    torch.manual_seed(0)
    model = models.build(spec.arch, spec.hparams).to(memory_format=torch.channels_last).train()
    bf16 = device.use_bf16(spec.train.precision, torch.device("cpu"), model)  # as the model trains
    step = _step_fn(spec, model if kind == "eager" else torch.compile(model), bf16)
    bs = spec.train.batch_size
    x = torch.randn(bs, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    t0 = time.perf_counter()
    step(x, y)
    first = time.perf_counter() - t0
    for _ in range(WARMUP):
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step(x, y)
    print(json.dumps({"first_step_s": round(first, 1), "images_per_s": round(bs * STEPS / (time.perf_counter() - t0)),
                      "precision": "bf16" if bf16 else "fp32"}))


if __name__ == "__main__":
    _compile_one(*sys.argv[1:3])
