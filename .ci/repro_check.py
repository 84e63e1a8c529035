"""Reproducibility checks for CI (run by .ci/run; each exits non-zero on failure).

  lock         the committed dvc.lock still matches the committed code and params
  smoke        rewrite params.yaml into the smoke profile (or --print the `dvc exp run -S` set)
  noop         a second `dvc repro` runs no stage (register included), within 5 seconds, and the
               register stage recorded the model the validation rule picks
  force STAGE  `dvc repro --force` of one train stage gives identical metrics and weights
  runcache     evaluation settings retrain nothing; after `dvc exp run -S loss=focal`, going back to
               `-S loss=ce` restores every train and evaluate stage from DVC's run-cache, within 60 s
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

SMOKE_SUBSET = 3000
# Metrics that measure the machine, not the result: they may differ between identical runs.
TIMING_KEYS = {"train_time_s", "images_per_s"}


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def lock() -> int:
    """Stages whose code or params changed since dvc.lock was written. Data and
    models are absent from a fresh clone (they live in DVC's cache/remote), so a
    missing dependency or output is not staleness; a modified or new one is."""
    if not Path("dvc.lock").exists():
        print("lock: no dvc.lock committed; run `dvc repro` and commit dvc.lock", file=sys.stderr)
        return 1
    res = dvc("status", "--json")
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return 1
    stale: dict[str, list[str]] = {}
    for stage, changes in json.loads(res.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                stale.setdefault(stage, []).append(str(change))
                continue
            for path, what in (change.get("changed deps") or {}).items():
                if isinstance(what, dict):  # params file: {"train.lr": "modified"}
                    stale.setdefault(stage, []).extend(f"{path}:{k} {v}" for k, v in what.items())
                elif what != "deleted":
                    stale.setdefault(stage, []).append(f"{path} {what}")
    if stale:
        print("lock: dvc.lock no longer matches the committed code and params.\n"
              "These stages are stale (the results committed with them were not produced by this code):",
              file=sys.stderr)
        for stage, why in stale.items():
            print(f"  {stage}: {', '.join(why)}", file=sys.stderr)
        print("Run `dvc repro` (make pipeline) and commit dvc.lock with the results.", file=sys.stderr)
        return 1
    print("lock: dvc.lock matches the committed code and params")
    return 0


def smoke_overrides(params: dict) -> list[str]:
    """The smoke profile as `-S` overrides: a stratified subset, one epoch, every model."""
    out = [f"train.subset={SMOKE_SUBSET}", "train.epochs=1"]
    for name, entry in (params.get("models") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("train"), dict) and "epochs" in entry["train"]:
            out.append(f"models.{name}.train.epochs=1")
    return out


def smoke(argv: list[str]) -> int:
    from fmnist import config, params, runspec

    sets = smoke_overrides(params.read("params.yaml"))
    if "--print" in argv:
        print(" ".join(f"-S {s}" for s in sets))
        return 0
    raw = params.read("params.yaml", sets)
    runspec.resolve(config.validate(raw))
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    print("smoke: params.yaml rewritten with " + " ".join(sets))
    return 0


def noop() -> int:
    t0 = time.perf_counter()
    res = dvc("repro")
    dt = time.perf_counter() - t0
    out = res.stdout + res.stderr
    if res.returncode != 0 or "Running stage" in out:
        print(f"noop: a second `dvc repro` ran stages:\n{out}", file=sys.stderr)
        return 1
    status = dvc("status", "--json")
    if json.loads(status.stdout or "{}"):
        print(f"noop: `dvc status` is not clean:\n{status.stdout}", file=sys.stderr)
        return 1
    print(f"noop: second `dvc repro` ran nothing in {dt:.1f} s; `dvc status` clean")
    if dt > 5:
        print("noop: slower than the 5 s goal", file=sys.stderr)
        return 1
    return champion()


def champion() -> int:
    """reports/champion.json (the register stage's record) names the model that the validation rule
    picks from the evaluations, the same one the report names best."""
    from fmnist import runspec, selection

    record = Path("reports/champion.json")
    if not record.is_file():
        print(f"noop: {record} missing: the register stage did not run", file=sys.stderr)
        return 1
    got = json.loads(record.read_text())
    evals = {m: json.loads(s.paths.eval_metrics.read_text()) for m, s in runspec.load("params.yaml").items()}
    chosen = selection.ranked(evals)[0]
    if got.get("model") != chosen:
        print(f"noop: {record} names {got.get('model')}; the validation rule picks {chosen}", file=sys.stderr)
        return 1
    if f"Best model: **{chosen}**" not in Path("reports/report.md").read_text():
        print(f"noop: reports/report.md does not name {chosen} best, as the validation rule does", file=sys.stderr)
        return 1
    print(f"noop: {chosen} is version {got['version']} of {got['registered_model']}; @{got['alias']} on version "
          f"{got['alias_version']}")
    return 0


def force(stage: str) -> int:
    """Force one train stage: the same metrics and bit-identical weights. The checkpoint file itself
    differs (it names its new MLflow run), so its dependents are brought up to date afterwards,
    as a user would, leaving the workspace (and the run-cache) consistent for the next checks."""
    from fmnist import checkpoint
    from fmnist.runspec import RunPaths

    paths = RunPaths.of(stage.split("@", 1)[1])
    before, (_, weights_before) = json.loads(paths.train_metrics.read_text()), checkpoint.read(paths.model)
    res = dvc("repro", "--force", "--single-item", stage)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return 1
    after, (_, weights_after) = json.loads(paths.train_metrics.read_text()), checkpoint.read(paths.model)
    diff = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
            if k not in TIMING_KEYS and before.get(k) != after.get(k)}
    if diff:
        print(f"force: {stage} forced again gave different metrics: {diff}", file=sys.stderr)
        return 1
    changed = [k for k in weights_before.keys() | weights_after.keys()
               if k not in weights_before or k not in weights_after
               or not torch.equal(weights_before[k], weights_after[k])]
    if changed:
        print(f"force: {stage} forced again gave different weights: {sorted(changed)}", file=sys.stderr)
        return 1
    print(f"force: {stage} forced again gave identical weights ({len(weights_after)} tensors) and metrics "
          f"({', '.join(f'{k}={v}' for k, v in after.items() if k not in TIMING_KEYS)})")
    res = dvc("repro")
    if res.returncode != 0:
        print(f"force: `dvc repro` after the forced stage failed:\n{res.stdout + res.stderr}", file=sys.stderr)
        return 1
    return 0


RUNCACHE_LIMIT_S = 60


def _exp_run(*sets: str, targets: tuple[str, ...] = ()) -> tuple[dict[str, str], float, str]:
    """`dvc exp run -S ... [TARGETS]` in the workspace: what happened to each stage (ran / cached), the time."""
    t0 = time.perf_counter()
    res = dvc("exp", "run", *[a for s in sets for a in ("-S", s)], *targets)
    dt = time.perf_counter() - t0
    out = res.stdout + res.stderr
    if res.returncode != 0:
        print(f"runcache: `dvc exp run {' '.join(sets)}` failed:\n{out}", file=sys.stderr)
        sys.exit(1)
    stages = {m: "ran" for m in re.findall(r"Running stage '([^']+)'", out)}
    stages.update({m: "cached" for m in re.findall(r"Stage '([^']+)' is cached - skipping run", out)})
    return stages, dt, out


def runcache() -> int:
    models = list(yaml.safe_load(Path("params.yaml").read_text())["models"])
    trains, evals = [f"train@{m}" for m in models], [f"evaluate@{m}" for m in models]
    stages, dt, out = _exp_run("evaluate.tta_flip=true")
    if any(stages.get(t) == "ran" for t in trains) or not all(stages.get(e) == "ran" for e in evals):
        print(f"runcache: -S evaluate.tta_flip=true must re-run every evaluation and no training:\n{out}",
              file=sys.stderr)
        return 1
    print(f"runcache: -S evaluate.tta_flip=true re-ran {len(evals)} evaluations and no training ({dt:.0f} s)")
    stages, dt, out = _exp_run("loss=focal", "evaluate.tta_flip=false")
    if not all(stages.get(t) == "ran" for t in trains):
        print(f"runcache: -S loss=focal must train every model:\n{out}", file=sys.stderr)
        return 1
    print(f"runcache: -S loss=focal trained {len(trains)} models ({dt:.0f} s)")
    stages, dt, out = _exp_run("loss=ce", targets=("evaluate",))  # every train and evaluate stage; not the report
    not_restored = [s for s in trains + evals if stages.get(s) != "cached"]
    if not_restored or dt > RUNCACHE_LIMIT_S:
        print(f"runcache: -S loss=ce must restore every train and evaluate stage from the run-cache within "
              f"{RUNCACHE_LIMIT_S} s; not restored: {not_restored}; took {dt:.0f} s:\n{out}", file=sys.stderr)
        return 1
    print(f"runcache: -S loss=ce restored all {len(trains + evals)} train and evaluate stages from the run-cache "
          f"in {dt:.0f} s")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "lock":
        return lock()
    if cmd == "smoke":
        return smoke(argv[1:])
    if cmd == "noop":
        return noop()
    if cmd == "force" and len(argv) == 2:
        return force(argv[1])
    if cmd == "runcache":
        return runcache()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
