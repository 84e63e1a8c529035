"""A seed x loss sweep with DVC's own grid syntax, queued and run with `dvc queue start -j 2`, then
`fmnist compare` over it. Checks that every model's run of every experiment landed, FINISHED, in the
repository-root MLflow store (not in DVC's temporary copies), and that compare aggregates the
sweep: n >= 2 per cell, t intervals over seeds, and the paired focal - cross-entropy column."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

# Seeds no earlier check used: every stage trains (and logs its MLflow run) instead of being
# restored from DVC's run-cache, which would log nothing.
SEEDS = (7, 8)
SWEEP = ["-S", f"seed={','.join(map(str, SEEDS))}", "-S", "loss=ce,focal"]
TIMEOUT_S = 40 * 60


def sh(*args: str) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"queue: `{' '.join(args)}` failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def run_sweep() -> float:
    t0 = time.time()
    queued = sh("dvc", "exp", "run", "--queue", *SWEEP)
    n = len(re.findall(r"Queued experiment", queued))
    if n != 2 * len(SEEDS):
        sys.exit(f"queue: `dvc exp run --queue {' '.join(SWEEP)}` queued {n} experiments, not {2 * len(SEEDS)}:\n"
                 f"{queued}")
    sh("dvc", "queue", "start", "-j", "2")
    while True:
        status = sh("dvc", "queue", "status")
        if not any(w in status for w in ("Running", "Queued")):
            break
        if time.time() - t0 > TIMEOUT_S:
            sh("dvc", "queue", "kill", *re.findall(r"^\S+", status, re.M)[1:])
            sys.exit(f"queue: experiments still running after {TIMEOUT_S} s:\n{status}")
        time.sleep(10)
    print(status)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    if failed:
        for name in failed:
            print(sh("dvc", "queue", "logs", name)[-4000:], file=sys.stderr)
        sys.exit(f"queue: experiments failed: {failed}")
    return time.time() - t0


def main() -> int:
    root = Path.cwd().resolve()
    models = list(yaml.safe_load(Path("params.yaml").read_text())["models"])
    took = run_sweep()

    from fmnist import tracking
    from fmnist.commands import compare

    runs = tracking.finished_runs(tracking.experiment_name(), {})
    got = {(r["tags"].get("model"), r["tags"].get("loss"), r["params"].get("seed")) for r in runs}
    missing = [f"{m}/{loss}/seed {s}" for m in models for loss in ("ce", "focal") for s in SEEDS
               if (m, loss, str(s)) not in got]
    if missing:
        sys.exit(f"queue: FINISHED runs missing from the repository-root store {root / 'mlflow.db'}: {missing}")
    strays = list((root / ".dvc/tmp/exps").rglob("mlflow.db")) if (root / ".dvc/tmp/exps").exists() else []
    if strays:
        sys.exit(f"queue: MLflow stores created inside DVC's temporary copies: {strays}")
    print(f"queue: {2 * len(SEEDS)} experiments ran with -j 2 in {took:.0f} s; all {2 * len(SEEDS) * len(models)} "
          "runs are in the root store")

    sh("fmnist", "compare", "--out", str(root / "reports"))
    cells, _ = compare.group(runs)
    swept = [c for c in cells if {str(s) for s in SEEDS} <= set(c.runs)]
    if {(c.model, c.loss) for c in swept} != {(m, loss) for m in models for loss in ("ce", "focal")}:
        sys.exit(f"queue: compare has no cell with seeds {SEEDS} for some model and loss: {[c.key for c in cells]}")
    problems = [f"{c.key}: {c.n} runs, accuracy interval {compare.summaries(c)['test_accuracy'].kind}"
                for c in swept if c.n < 2 or compare.summaries(c)["test_accuracy"].kind != "t"]
    diffs = [d for d in compare.differences(swept) if len(d.seeds) >= 2]
    problems += [f"{m}: no paired focal - ce difference over 2 seeds" for m in models
                 if not any(d.ce.model == m and d.deltas["test_accuracy"] is not None for d in diffs)]
    md = (root / "reports/compare.md").read_text()
    problems += [f"compare.md lacks {s!r}" for s in ("| n |", "(95% CI)", "Focal loss minus cross-entropy, paired by seed",
                                                    "Δ test accuracy") if s not in md]
    if problems:
        sys.exit("queue: fmnist compare does not aggregate the sweep:\n  " + "\n  ".join(problems))
    print(f"queue: fmnist compare: {len(swept)} cells with n >= 2 and t intervals, {len(diffs)} paired "
          "focal - cross-entropy differences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
