"""Queue two experiments, run them with `dvc queue start -j 2`, and check that every
model's run of both landed, FINISHED, in the repository-root MLflow store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

# Seeds no earlier check used: every stage trains (and logs its MLflow run) instead of being
# restored from DVC's run-cache, which would log nothing.
EXPERIMENTS = {"ci-focal-seed7": ["-S", "loss=focal", "-S", "seed=7"], "ci-seed8": ["-S", "seed=8"]}
TIMEOUT_S = 30 * 60


def sh(*args: str) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"queue: `{' '.join(args)}` failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def main() -> int:
    root = Path.cwd().resolve()
    models = list(yaml.safe_load(Path("params.yaml").read_text())["models"])
    stamp = f"{int(time.time())}"
    names = {f"{name}-{stamp}": args for name, args in EXPERIMENTS.items()}
    t0 = time.time()
    for name, args in names.items():
        sh("dvc", "exp", "run", "--queue", "-n", name, *args)
    sh("dvc", "queue", "start", "-j", "2")
    while True:
        status = sh("dvc", "queue", "status")
        if not any(w in status for w in ("Running", "Queued")):
            break
        if time.time() - t0 > TIMEOUT_S:
            sh("dvc", "queue", "kill", *names)
            sys.exit(f"queue: experiments still running after {TIMEOUT_S} s:\n{status}")
        time.sleep(10)
    print(status)
    failed = [n for n in names if any(n in line and "Failed" in line for line in status.splitlines())]
    if failed:
        for n in failed:
            print(sh("dvc", "queue", "logs", n)[-4000:], file=sys.stderr)
        sys.exit(f"queue: experiments failed: {failed}")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashion-mnist")
    missing = []
    for name in names:
        runs = client.search_runs([exp.experiment_id], f"tags.dvc_exp_name = '{name}'", max_results=1000)
        got = {r.data.tags.get("model") for r in runs if r.info.status == "FINISHED"}
        missing += [f"{name}/{m}" for m in models if m not in got]
        print(f"queue: {name}: {len(got)} FINISHED runs in {root / 'mlflow.db'}")
    if missing:
        sys.exit(f"queue: runs missing from the repository-root store: {missing}")
    strays = [p for p in (root / ".dvc/tmp/exps").rglob("mlflow.db")] if (root / ".dvc/tmp/exps").exists() else []
    if strays:
        sys.exit(f"queue: MLflow stores created inside DVC's temporary copies: {strays}")
    print(f"queue: both experiments ran with -j 2; all {2 * len(models)} runs are in the root store "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
