"""One process against two (torchrun, DistributedDataParallel, gloo), side by side in one run.

    python -m benchmarks.ddp              # after `dvc repro preprocess`; about 15 minutes on 2 cores

Each side is `fmnist train MODEL [--nproc 2]` as a user runs it, in a scratch copy of the repository
(its own MLflow store) on the processed splits of this one, then `fmnist evaluate MODEL`. With two
processes each gets half the cores (OMP threads = cores / processes), so neither side oversubscribes
the machine. tinyvgg trains its full params.yaml schedule, and the two test accuracies must agree
within 0.5 point; fmnet trains one epoch, for its throughput. One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import emit, machine, scratch_repo

RUNS = {"tinyvgg": [], "fmnet": ["--set", "models.fmnet.train.epochs=1"]}
AGREE_POINTS = 0.5


def side(root: Path, model: str, nproc: int, sets: list[str]) -> dict:
    work = scratch_repo(root / f"{model}-{nproc}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    for cmd in (["train", model, "--no-progress", "--nproc", str(nproc), *sets], ["evaluate", model, *sets]):
        res = subprocess.run([sys.executable, "-m", "fmnist", *cmd], cwd=work, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"`fmnist {' '.join(cmd)}` failed:\n{res.stderr[-3000:]}")
    train = json.loads((work / f"reports/train/{model}/metrics.json").read_text())
    test = json.loads((work / f"reports/eval/{model}/metrics.json").read_text())
    return {"nproc": nproc, "train_s": train["train_time_s"], "images_per_s": train["images_per_s"],
            "epochs": train["epochs"], "test_accuracy": test["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(RUNS), help="comma-separated models of: " + ", ".join(RUNS))
    args = ap.parse_args(argv)
    if not Path("data/processed/train.pt").is_file():
        raise SystemExit("data/processed is missing: run `dvc repro preprocess` first")
    emit(machine())
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.only.split(","):
            one, two = side(Path(tmp), model, 1, RUNS[model]), side(Path(tmp), model, 2, RUNS[model])
            line = {"comparison": f"{model}: 1 process against 2 (gloo, {os.cpu_count()} cores)", "one": one,
                    "two": two, "throughput_ratio": round(two["images_per_s"] / one["images_per_s"], 2)}
            if not RUNS[model]:  # the full schedule: the accuracies must agree
                delta = 100 * (two["test_accuracy"] - one["test_accuracy"])
                line.update(accuracy_delta_points=round(delta, 2), goal=f"within {AGREE_POINTS} point",
                            met=abs(delta) <= AGREE_POINTS)
                ok &= line["met"]
            emit(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
