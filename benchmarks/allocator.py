"""What the memory allocator does to the conv nets' training steps: the step as ``peak`` times it, in
fresh processes that take turns, one under the C library's malloc (``FMNIST_MALLOC=system``) and one
under tcmalloc (fmnist.allocator, as every ``fmnist`` command runs), ``rounds`` times each; each
model's median images/s and their ratio. A process chooses its allocator when it starts, which is why
these are processes and not variants in one process (benchmarks.levers).

    python -m benchmarks.allocator             # one process's figures, under its own allocator
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

MODELS = ("tinyvgg", "fashionnet", "cnn_bn", "fmnet")


def throughputs() -> dict:
    """This process's training-step images/s for each conv net, and the allocator it runs under."""
    from benchmarks.peak import training_throughput
    from benchmarks.run import ensure_raw, load_data
    from fmnist import allocator, runspec

    train, _, stats = load_data(ensure_raw())
    specs = runspec.load("params.yaml")
    return {"tcmalloc": allocator.preloaded(),
            **{name: training_throughput(specs[name], train, stats)[0] for name in MODELS}}


def allocator_report(rounds: int = 3) -> list[dict]:
    from fmnist import allocator

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    runs: dict[str, list[dict]] = {"system": [], "tcmalloc": []}
    for _ in range(rounds):
        for choice in runs:
            done = subprocess.run([sys.executable, "-m", "benchmarks.allocator"], env={**env, allocator.ENV: choice},
                                  capture_output=True, text=True, check=True)
            runs[choice].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not all(r["tcmalloc"] for r in runs["tcmalloc"]):
        return [{"part": "allocator", "skipped": f"no lib{allocator.LIBRARY} on this machine "
                                                 "(Debian, Ubuntu: apt-get install libtcmalloc-minimal4)"}]
    rows = []
    for name in MODELS:
        system = statistics.median(r[name] for r in runs["system"])
        tcmalloc = statistics.median(r[name] for r in runs["tcmalloc"])
        rows.append({"part": "allocator", "model": name, "rounds": rounds,
                     "images_per_s": {"system": round(system), "tcmalloc": round(tcmalloc)},
                     "ratio_tcmalloc_over_system": round(tcmalloc / system, 2)})
    return rows


if __name__ == "__main__":
    from fmnist import allocator

    allocator.use_tcmalloc()  # unless FMNIST_MALLOC=system
    print(json.dumps({k: v if isinstance(v, bool) else round(v) for k, v in throughputs().items()}))
