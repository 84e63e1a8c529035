"""How far the served champion's probabilities can be trusted, measured through the served model.

    python -m benchmarks.served_calibration     # after `make pipeline` (it registers @champion)

Loads ``models:/fashion-mnist@champion`` with mlflow.pyfunc, as `mlflow models serve` loads it, feeds
it the 10,000 test images as the served signature takes them ((N, 28, 28) float32 pixels), and scores
the probabilities it returns: accuracy, NLL, ECE (15 bins, top-label) and Brier score. Prints one
JSON line with the machine, and exits 1 when the ECE is above GOAL_ECE.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchmarks.run import emit, machine
from fmnist.core import calibration
from fmnist.data.loader import load_split
from fmnist.tracking import registry

GOAL_ECE = 0.02
URI = f"models:/{registry.REGISTERED_MODEL}@{registry.ALIAS}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=URI, help=f"a models:/ or runs:/ URI (default: {URI})")
    ap.add_argument("--processed", default="data/processed", help="the folder of test.pt")
    args = ap.parse_args(argv)
    test = load_split("test", args.processed)
    served = registry.load(args.model)
    probs = np.concatenate([served.predict(test.images[i:i + 1000].float().numpy())
                            for i in range(0, len(test), 1000)])
    logp = torch.from_numpy(probs).double().clamp_min(1e-12).log()
    right = float((logp.argmax(1) == test.labels).double().mean())
    scores = calibration.scores(logp, test.labels)
    info = served.metadata.run_id if served.metadata else None
    emit({"benchmark": "served_calibration", "model": args.model, "run_id": info, "images": len(test),
          "accuracy": round(right, 4), "mean_confidence": round(float(probs.max(1).mean()), 4),
          **{k: round(v, 4) for k, v in scores.items()}, "goal_ece": GOAL_ECE, **machine()})
    if scores["ece"] > GOAL_ECE:
        print(f"served_calibration: ECE {scores['ece']:.4f} is above the goal {GOAL_ECE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
