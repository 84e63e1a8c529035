"""What an MLflow Model per training costs the pipeline, measured in the train stages themselves.

    python -m benchmarks.model_logging [--only fmnet,tinyvgg] [--epochs 1] [--subset 6000]

`dvc repro` runs each train stage as a fresh process, so this does too: `fmnist train MODEL` in a
scratch copy of the repository (its params.yaml and data/processed, fresh SQLite stores), for each
model twice, one after the other (which goes first alternates): once as the pipeline runs it, and
once with what serving added switched off (the MLflow Model, the lineage inputs and the
system-metrics sampler): the reference.
A short training (one epoch of a subset) is enough: none of the three depends on how long the model
trained, and the training before them has already imported what the optimiser needs (torch._dynamo,
which torch.export needs too). One JSON line per model: both stage times, their difference, and the
time of each addition measured inside the stage; then the register stage's registration of the
champion; then the totals against the budgets (5 s a model, 40 s the whole pipeline). Exits 1 naming
a missed budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import emit, machine, scratch_repo

PER_MODEL_BUDGET_S = 5.0
PIPELINE_BUDGET_S = 40.0


# --------------------------------------------------------------------------- inside one train stage

def _timed(times: dict[str, float], key: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t
    return wrapper


def stage(model: str, argv: list[str], without: bool) -> tuple[int, dict[str, float]]:
    """Run ``fmnist train MODEL ARGV`` in this process with the additions timed, or switched off; the
    exit status and the seconds each addition took."""
    from unittest import mock

    from fmnist import cli
    from fmnist.commands import train
    from fmnist.tracking import registry, runs

    times: dict[str, float] = {}
    if without:
        patches = {(registry, "log_model"): lambda *a, **k: "", (runs.Run, "log_input"): lambda *a, **k: None,
                   (runs, "_system_metrics"): lambda *a, **k: None, (train, "data_digest"): lambda p: ("", {})}
    else:
        start = _timed(times, "system_metrics_s", runs._system_metrics)

        def system_metrics(*args, **kwargs):
            monitor = start(*args, **kwargs)
            if monitor is not None:
                monitor.finish = _timed(times, "system_metrics_s", monitor.finish)
            return monitor
        patches = {(registry, "log_model"): _timed(times, "log_model_s", registry.log_model),
                   (runs.Run, "log_input"): _timed(times, "lineage_s", runs.Run.log_input),
                   (train, "data_digest"): _timed(times, "lineage_s", train.data_digest),
                   (runs, "_system_metrics"): system_metrics}
    with contextlib.ExitStack() as stack:
        for (owner, name), fn in patches.items():
            stack.enter_context(mock.patch.object(owner, name, fn))
        rc = cli.main(["train", model, "--no-progress", *argv])
    return rc, {k: round(v, 3) for k, v in times.items()}


# --------------------------------------------------------------------------- the comparison

def _run_stage(model: str, argv: list[str], ws: Path, store: str, without: bool) -> tuple[float, dict]:
    out = ws / f"{model}.{'without' if without else 'with'}.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.model_logging", "--stage", model, "--out", str(out),
           *(["--without"] if without else []), "--", *argv]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"fmnist train {model} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(out.read_text())


def _registration(store: str) -> dict:
    """The register stage's part: register the best of the runs as the champion, as the stage does (the
    first time, so the registered model is created too), timed with MLflow already imported."""
    from fmnist import runspec, tracking
    from fmnist.tracking import registry

    os.environ["MLFLOW_TRACKING_URI"] = store
    best = max(tracking.finished_runs(), key=lambda r: r["metrics"]["val_accuracy"])
    spec = runspec.load("params.yaml")[best["tags"]["model"]]
    t = time.perf_counter()
    champ = registry.promote(spec, best["run_id"], best["metrics"]["val_accuracy"])
    seconds = time.perf_counter() - t  # a store that refuses it raises: the benchmark fails naming it
    return {"comparison": "register: the champion", "model": spec.model, "version": champ.version,
            "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated models (default: every model of params.yaml)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs each stage trains (default 1)")
    ap.add_argument("--subset", type=int, default=6000, help="training images each stage uses (default 6000)")
    ap.add_argument("--processed", default="data/processed", help="the processed splits (make pipeline's)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--without", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        rc, times = stage(args.stage, args.rest, args.without)
        Path(args.out).write_text(json.dumps(times))
        return rc

    import yaml

    every = list(yaml.safe_load(Path("params.yaml").read_text())["models"])
    models = args.only.split(",") if args.only else every
    if unknown := set(models) - set(every):
        ap.error(f"--only: not in params.yaml's models: {', '.join(sorted(unknown))}")
    processed = Path(args.processed)
    if not (processed / "train.pt").is_file():
        ap.error(f"{processed}/train.pt is missing: run `dvc repro preprocess` (or `make pipeline`) first")
    short = ["--set", f"train.epochs={args.epochs}", "--set", f"train.subset={args.subset}"]

    emit({"machine": machine(), "models": models, "epochs": args.epochs, "subset": args.subset})
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmnist-model-logging-") as tmp:
        ws = scratch_repo(Path(tmp) / "ws", processed)
        store_with, store_without = f"sqlite:///{tmp}/with.db", f"sqlite:///{tmp}/without.db"
        for i, model in enumerate(models):  # which side goes first alternates, so neither gets the warmer cache
            first, second = (True, False) if i % 2 == 0 else (False, True)
            timed = {w: _run_stage(model, short, ws, store_without if w else store_with, without=w)
                     for w in (first, second)}
            (without_s, _), (with_s, inside) = timed[True], timed[False]
            added = sum(inside.values())
            row = {"comparison": f"train@{model}: with an MLflow Model, lineage and system metrics, against "
                                 "without", "model": model, "stage_without_s": round(without_s, 2),
                   "stage_with_s": round(with_s, 2), "wall_difference_s": round(with_s - without_s, 2),
                   **inside, "added_inside_s": round(added, 3), "ratio": round(with_s / without_s, 3)}
            rows.append(row)
            emit(row)
        with contextlib.redirect_stdout(sys.stderr):  # MLflow's registration chatter
            reg = _registration(store_with)
        emit(reg)

    worst = max(rows, key=lambda r: r["log_model_s"])
    total = sum(r["added_inside_s"] for r in rows) + reg["seconds"]
    summary = {"comparison": "budgets", "worst_log_model_s": worst["log_model_s"], "worst_model": worst["model"],
               "per_model_budget_s": PER_MODEL_BUDGET_S, "pipeline_added_s": round(total, 2),
               "pipeline_wall_difference_s": round(sum(r["wall_difference_s"] for r in rows), 2),
               "pipeline_budget_s": PIPELINE_BUDGET_S, "models": len(rows)}
    emit(summary)
    missed = []
    if worst["log_model_s"] > PER_MODEL_BUDGET_S:
        missed.append(f"logging {worst['model']}'s MLflow Model took {worst['log_model_s']:.2f} s "
                      f"(budget {PER_MODEL_BUDGET_S:.0f} s)")
    if len(rows) == len(every) and total > PIPELINE_BUDGET_S:
        missed.append(f"the pipeline's train stages and registration grow by {total:.1f} s "
                      f"(budget {PIPELINE_BUDGET_S:.0f} s)")
    for m in missed:
        print(f"missed: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
