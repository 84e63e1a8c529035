"""Where one training step of each conv net spends its time: ``torch.profiler``, per operator.

The step is the core's (forward in the model's precision, the loss, backward, the optimizer's step)
at the model's params.yaml batch size, on real training batches, as ``benchmarks.peak`` times it:
WARMUP steps first, then STEPS profiled. Each operator's self time (its own, not its callees') as a
share of the profiled steps' total, largest first.
"""

from __future__ import annotations

from fmnist.data.loader import Split, Stats
from fmnist.runspec import RunSpec

CONV_NETS = ("tinyvgg", "fashionnet", "cnn_bn", "fmnet")
WARMUP, STEPS = 5, 10


def profile_step(spec: RunSpec, train: Split, stats: Stats, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.peak import prepare

    p = prepare(spec, train, stats, WARMUP + STEPS)
    for x, y in p.batches[:WARMUP]:
        p.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in p.batches[WARMUP:]:
            p.step(x, y)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return {"model": spec.model, "batch_size": spec.train.batch_size, "precision": "bf16" if p.bf16 else "fp32",
            "channels_last": p.channels_last, "step_ms": round(total / STEPS / 1e3, 1),
            "operators": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
                           "ms_per_step": round(e.self_cpu_time_total / STEPS / 1e3, 2)} for e in ranked[:top]]}


def profile_report(specs: dict[str, RunSpec], train: Split, stats: Stats) -> list[dict]:
    return [profile_step(specs[m], train, stats) for m in CONV_NETS if m in specs]
