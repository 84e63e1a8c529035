"""The pipeline against its FLOP floor: what its arithmetic needs at this machine's peak, and what
`dvc repro` takes.

- ``floor``: for every model of params.yaml, the FLOPs its train and evaluate stages compute
  (``torch.utils.flop_counter``: matmuls and convolutions, forward and backward), each over the peak,
  measured in this run, of the precision the model trains in (a large matmul, fp32, and bf16 where
  the CPU has it in hardware). The floor is the time the pipeline would take if every stage ran its
  arithmetic at that peak and cost nothing else.
- ``pipeline``: a full default ``dvc repro`` in a fresh clone of this repository's HEAD (an empty
  workspace and DVC cache; the data from the local copy), then ``dvc exp run -S loss=focal`` in it,
  each timed whole against the floor; and every model's test accuracy against the committed figure.

What a stage computes, per model (n_train and n_val from ``data.val_fraction`` and ``train.subset``):
train: epochs x (n_train forward and backward + n_val forward, the epoch's validation) + n_val
forward (the temperature's fit); evaluate: (10,000 test + n_val validation) forward, twice with flip
test-time augmentation. Download, preprocess, report and register compute no model arithmetic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmnist.core import device, models
from fmnist.runspec import RunSpec

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
PIPELINE_GOAL = 1.5  # the pipeline's time over its floor, at most
ACCURACY_GOAL = 0.2  # points: each model's test accuracy against the committed one, at most this far off
REPO = Path(__file__).resolve().parents[1]


def forward_flops(spec: RunSpec, batch: int = 64) -> float:
    """Forward FLOPs of one image in evaluation mode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build(spec.arch, spec.hparams).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 1, 28, 28))
    return counter.get_total_flops() / batch


def images(spec: RunSpec) -> tuple[int, int]:
    """(training images, validation images) of this run, as preprocess splits them."""
    n_val = round(TRAIN_IMAGES * spec.data.val_fraction)
    n_train = TRAIN_IMAGES - n_val
    return (min(spec.train.subset, n_train) if spec.train.subset else n_train), n_val


def stage_flops(spec: RunSpec) -> dict[str, float]:
    n_train, n_val = images(spec)
    from benchmarks.peak import flops_per_image

    fwd, fwd_bwd = forward_flops(spec), flops_per_image(spec)
    views = 2 if spec.evaluate.tta_flip else 1
    return {"train": spec.train.epochs * (n_train * fwd_bwd + n_val * fwd) + n_val * fwd,
            "evaluate": views * (TEST_IMAGES + n_val) * fwd}


def peaks() -> dict[str, float]:
    """GFLOP/s of a large matmul, fp32 and (where the CPU has it in hardware) bf16, measured now."""
    from benchmarks.peak import peak_gflops

    out = {"fp32": peak_gflops(torch.float32)}
    if device.cpu_has_native_bf16():
        out["bf16"] = peak_gflops(torch.bfloat16)
    return out


def floor_report(specs: dict[str, RunSpec]) -> tuple[list[dict], float]:
    """One row per model (its stages' TFLOP, precision and floor) and the pipeline's floor in seconds."""
    peak = peaks()
    rows, total = [], 0.0
    for name, spec in specs.items():
        model = models.build(spec.arch, spec.hparams)
        kind = "bf16" if device.use_bf16(spec.train.precision, torch.device("cpu"), model) else "fp32"
        flops = stage_flops(spec)
        seconds = sum(flops.values()) / (peak[kind] * 1e9)
        total += seconds
        rows.append({"model": name, "precision": kind, "train_tflop": round(flops["train"] / 1e12, 3),
                     "evaluate_tflop": round(flops["evaluate"] / 1e12, 3), "floor_s": round(seconds, 1)})
    return [{"peak_gflop_per_s": {k: round(v, 1) for k, v in peak.items()}, "floor_s": round(total, 1)}, *rows], total


# --------------------------------------------------------------------------- the pipeline, timed whole

def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {done.returncode}) in {cwd}; its output: {log}\n"
                         + log.read_text(errors="replace")[-3000:])
    return seconds


def fresh_clone(work: Path) -> tuple[Path, dict[str, str]]:
    """A clone of HEAD (committed work only) with an empty DVC cache, and the environment its stages
    run in: this venv's commands, the clone's own code, its own MLflow store."""
    clone = work / "fmnist"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    for key, value in (("user.email", "bench@fmnist.invalid"), ("user.name", "fmnist bench")):
        subprocess.run(["git", "-C", str(clone), "config", key, value], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(clone / "src"), "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "FMNIST_RESUME"):
        env.pop(key, None)
    raw = REPO / "data" / "raw"
    if raw.is_dir() and "FMNIST_SOURCE" not in env:
        env["FMNIST_SOURCE"] = str(raw)  # the local copy: the official mirrors may be out of reach
    return clone, env


def committed_accuracy(clone: Path, model: str) -> float:
    shown = subprocess.run(["git", "-C", str(clone), "show", f"HEAD:reports/eval/{model}/metrics.json"],
                           capture_output=True, text=True, check=True).stdout
    return json.loads(shown)["test_accuracy"]


def pipeline_report(floor_s: float, models_: list[str]) -> list[dict]:
    """``dvc repro`` and ``dvc exp run -S loss=focal`` in a fresh clone, each against the floor; then
    each model's accuracy against the committed one."""
    work = Path(tempfile.mkdtemp(prefix="fmnist-bench-"))
    try:
        clone, env = fresh_clone(work)
        log = work / "pipeline.log"
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        rows = []
        for label, cmd in (("dvc repro, from an empty workspace", ["dvc", "repro"]),
                           ("dvc exp run -S loss=focal", ["dvc", "exp", "run", "-S", "loss=focal"])):
            seconds = _run(cmd, clone, env, log)
            ratio = seconds / floor_s
            rows.append({"comparison": label, "commit": commit, "seconds": round(seconds, 1),
                         "floor_s": round(floor_s, 1), "ratio_to_floor": round(ratio, 2),
                         "goal": f"<= {PIPELINE_GOAL:g}x the floor", "met": ratio <= PIPELINE_GOAL,
                         **({} if ratio <= PIPELINE_GOAL else
                            {"missed_by": {"seconds": round(seconds - PIPELINE_GOAL * floor_s, 1)}})})
            if cmd == ["dvc", "repro"]:
                for m in models_:
                    ours = json.loads((clone / "reports" / "eval" / m / "metrics.json").read_text())["test_accuracy"]
                    committed = committed_accuracy(clone, m)
                    delta = 100 * (ours - committed)
                    met = abs(delta) <= ACCURACY_GOAL
                    rows.append({"comparison": f"{m}: test accuracy against the committed figure",
                                 "committed": committed, "this_run": ours, "delta_points": round(delta, 2),
                                 "goal": f"within {ACCURACY_GOAL} point", "met": met,
                                 **({} if met else {"missed_by": {"points": round(abs(delta) - ACCURACY_GOAL, 2)}})})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
