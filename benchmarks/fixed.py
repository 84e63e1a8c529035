"""What a stage costs before and after its work: a train stage of a model that trains almost nothing
and its evaluate stage, each a fresh process as `dvc repro` runs it, timed whole; and where their
seconds go: among the packages the train stage imports (``python -X importtime``), and among
fmnist's own functions in each stage (cProfile).

The train stage: ``fmnist train logistic --no-progress --set train.subset=6000 --set train.epochs=1``
(one epoch of 6,000 images: well under a second of arithmetic), then ``fmnist evaluate logistic``, in
a scratch folder with params.yaml, dvc.yaml, the processed splits and an MLflow store of its own (made
by a first, untimed pair, as a pipeline's first stage makes it). Median of ``repeats`` runs of each.

Beside each, taking turns with it, the same stage (under the same allocator) with CPython's cyclic
garbage collector at its defaults (``fmnist.cli.main`` called without the console script's
``console``), so the share of the collector's settings is measured in the same run.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "logistic"
SHORT = ["--set", "train.subset=6000", "--set", "train.epochs=1"]
GOALS = {"train": 7.0, "evaluate": 5.0}  # seconds, whole stage, at most
FMNIST = str(Path(sys.executable).with_name("fmnist"))  # the console script `dvc repro` runs


DEFAULT_GC = (sys.executable, "-c", "import sys; from fmnist.cli import main; sys.exit(main())")


def commands(model: str = MODEL, script: tuple[str, ...] = (FMNIST,)) -> dict[str, list[str]]:
    return {"train": [*script, "train", model, "--no-progress", *SHORT], "evaluate": [*script, "evaluate", model]}


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def import_costs(stderr: str, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """From ``-X importtime`` output: the seconds of all imports, and the packages that cost most
    (each first-level import's cumulative time, summed per top-level package)."""
    per: dict[str, float] = {}
    total = 0.0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        if len(m.group(3)) == 1:  # a first-level import: its cumulative time holds everything below it
            us = int(m.group(2))
            total += us
            root = m.group(4).split(".")[0]
            per[root] = per.get(root, 0.0) + us
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return total / 1e6, [(name, us / 1e6) for name, us in ranked]


def profiled(cmd: list[str], cwd: Path, env: dict[str, str], top: int = 10) -> list[tuple[str, float]]:
    """The stage under cProfile: the functions of fmnist that take most of it (cumulative seconds,
    callees included, so nested ones overlap; cProfile's own overhead makes them all a little longer)."""
    import pstats

    out = cwd / "stage.prof"
    _timed([sys.executable, "-m", "cProfile", "-o", str(out), *cmd], cwd, env)
    rows = []
    for (file, line, name), (_, _, _, cumulative, _) in pstats.Stats(str(out)).stats.items():
        path = Path(file)
        if "fmnist" in path.parts and path.suffix == ".py" and name not in ("main", "<module>"):
            module = ".".join(path.with_suffix("").parts[path.parts.index("fmnist"):])
            rows.append((f"{module}.{name}", cumulative))
    out.unlink(missing_ok=True)
    return sorted(rows, key=lambda r: -r[1])[:top]


def fixed_report(processed: Path, repeats: int = 3) -> list[dict]:
    from benchmarks.run import scratch_repo

    work = Path(tempfile.mkdtemp(prefix="fmnist-fixed-"))
    try:
        repo = scratch_repo(work / "repo", processed)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "FMNIST_RESUME")}
        cmds, default_gc = commands(), commands(script=DEFAULT_GC)
        for cmd in cmds.values():  # the store, the experiment and the registered model's first costs
            _timed(cmd, repo, env)
        times: dict[str, list[float]] = {stage: [] for stage in cmds}
        times_default_gc: dict[str, list[float]] = {stage: [] for stage in cmds}
        for _ in range(repeats):
            for stage, cmd in cmds.items():
                times[stage].append(_timed(cmd, repo, env)[0])
                times_default_gc[stage].append(_timed(default_gc[stage], repo, env)[0])
        rows = []
        for stage, seconds in times.items():
            median = statistics.median(seconds)
            met = median <= GOALS[stage]
            rows.append({"comparison": f"fixed cost: {stage} stage of {MODEL}, whole process",
                         "command": "fmnist " + " ".join(cmds[stage][1:]),
                         "seconds_median": round(median, 2), "seconds": [round(s, 2) for s in seconds],
                         "goal": f"<= {GOALS[stage]:g} s", "met": met,
                         **({} if met else {"missed_by": {"seconds": round(median - GOALS[stage], 2)}})})
            default = statistics.median(times_default_gc[stage])
            rows.append({"part": f"the {stage} stage with the garbage collector at CPython's defaults, taking turns",
                         "seconds_median": round(default, 2),
                         "seconds": [round(s, 2) for s in times_default_gc[stage]],
                         "console_script_saves_s": round(default - median, 2),
                         "ratio_default_over_console": round(default / median, 2)})
        wall, stderr = _timed([sys.executable, "-X", "importtime", *cmds["train"]], repo, env)
        total, ranked = import_costs(stderr)
        rows.append({"part": "imports of the train stage (python -X importtime, one run)",
                     "stage_s": round(wall, 2), "imports_s": round(total, 2),
                     "by_package_s": {name: round(s, 2) for name, s in ranked}})
        for stage, cmd in cmds.items():
            rows.append({"part": f"the {stage} stage's own functions (cProfile, cumulative, one run)",
                         "functions_s": {name: round(s, 2) for name, s in profiled(cmd, repo, env)}})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
