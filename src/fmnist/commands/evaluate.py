"""evaluate@MODEL: test-set metrics, calibration, per-class scores and the confusion data of one trained model.

The model, its normalisation and its precision come from the checkpoint; how to evaluate
(``evaluate:`` in params.yaml: batch size, flip test-time augmentation) from the run spec, so
``dvc exp run -S evaluate.tta_flip=true`` re-runs evaluation without retraining anything.

The validation split is scored the same way: its accuracy and NLL are the figures to choose a champion
on (never the test set's), and one temperature fitted on it shows how much of the test
NLL and ECE is miscalibration that a single scalar removes (``*_ts``: after temperature scaling).
"""

from __future__ import annotations

import logging

import torch

from fmnist import checkpoint
from fmnist.core import calibration, engine, metrics
from fmnist.core.device import select_device
from fmnist.data import CLASSES
from fmnist.data.loader import load_split
from fmnist.files import remove_stale, write_csv, write_json
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> dict:
    from fmnist import tracking

    tracking.tracking_uri()  # a malformed MLFLOW_TRACKING_URI stops here, before anything is written
    out = spec.paths
    model, ck = checkpoint.load(out.model)
    if ck.spec.params_hash != spec.params_hash:
        log.warning("%s was trained with other params than params.yaml gives now; `dvc repro` retrains it", out.model)
    test, val = load_split("test", out.processed), load_split("val", out.processed)
    device = select_device(spec.train.device)
    model = model.to(device)

    def predict(split):
        return engine.predict(model, split, ck.stats, batch_size=spec.evaluate.batch_size, device=device,
                              bf16=ck.bf16, tta_flip=spec.evaluate.tta_flip)

    logp, logp_val = predict(test), predict(val)
    scores, val_scores = metrics.score(logp, test.labels), metrics.score(logp_val, val.labels)
    temperature = calibration.fit_temperature(logp_val, val.labels)
    if val_scores["accuracy"] == 1:
        log.warning("%s gets every validation image right: no temperature minimises its NLL (T = %.3g is "
                    "the search's end), so the *_ts scores mean little", spec.model, temperature)
    scaled = calibration.scale(logp, temperature)
    before, after = calibration.scores(logp, test.labels), calibration.scores(scaled, test.labels)
    conf, pred = logp.exp().max(1)
    per_class = metrics.per_class(pred, test.labels)
    result = {"test_accuracy": scores["accuracy"], "test_nll": scores["loss"],
              "test_nll_se": calibration.nll_se(logp, test.labels), "test_ece": before["ece"],
              "test_brier": before["brier"], "test_nll_ts": after["nll"], "test_ece_ts": after["ece"],
              "test_brier_ts": after["brier"], "temperature": temperature,
              "val_accuracy": val_scores["accuracy"], "val_nll": val_scores["loss"],
              "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class)}
    bins = reliability_rows(logp, scaled, test.labels)

    remove_stale(out.eval_metrics, out.per_class, out.predictions, out.calibration)  # left by a killed run
    write_csv(out.predictions, [
        {"index": int(i), "actual": CLASSES[a], "predicted": CLASSES[p], "confidence": round(float(c), 4)}
        for i, a, p, c in zip(test.index.tolist(), test.labels.tolist(), pred.tolist(), conf.tolist())])
    write_csv(out.calibration, bins, fieldnames=CALIBRATION_COLUMNS)
    write_json(out.per_class, per_class)
    write_json(out.eval_metrics, result)
    _log_to_mlflow(spec, ck.run_id, result, per_class, metrics.confusion_matrix(pred, test.labels), bins)
    return result


CALIBRATION_COLUMNS = ["bin_lo", "bin_hi", "count", "confidence", "accuracy", "count_ts", "confidence_ts",
                       "accuracy_ts"]


def reliability_rows(logp: torch.Tensor, scaled: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """calibration.csv: per confidence bin, the test images before and after temperature scaling
    (count, mean confidence, accuracy; None, an empty cell, for an empty bin)."""
    rows = []
    for b, a in zip(calibration.reliability(logp, labels), calibration.reliability(scaled, labels)):
        row = {"bin_lo": round(b["bin_lo"], 6), "bin_hi": round(b["bin_hi"], 6)}
        for suffix, r in (("", b), ("_ts", a)):
            row[f"count{suffix}"] = r["count"]
            row.update({f"{k}{suffix}": None if r[k] is None else round(r[k], 6) for k in ("confidence", "accuracy")})
        rows.append({k: row[k] for k in CALIBRATION_COLUMNS})
    return rows


# The run already holds the training's per-epoch val_accuracy (step = epoch, without test-time
# augmentation): evaluate's figures for the validation split go beside it, not into that curve.
MLFLOW_NAMES = {"val_accuracy": "eval_val_accuracy", "val_nll": "eval_val_nll"}


def _log_to_mlflow(spec: RunSpec, run_id: str | None, result: dict, per_class: dict, cm: torch.Tensor,
                   bins: list[dict]) -> None:
    from fmnist import plots, tracking

    run = tracking.existing_run(run_id)
    if run is None:
        log.warning("MLflow run %s (from the checkpoint) is not in %s; test metrics not logged there",
                    run_id, tracking.tracking_uri())
        return
    flat = {MLFLOW_NAMES.get(k, k): v for k, v in result.items()}
    for cls, s in per_class.items():
        key = "".join(ch if ch.isalnum() else "_" for ch in cls).strip("_").lower()
        flat.update({f"{m}_{key}": v for m, v in s.items()})
    run.log_metrics(flat)
    run.log_dict({"classes": list(CLASSES), "rows_actual_cols_predicted": cm.tolist()}, "confusion_matrix.json")
    title = f"{spec.model}: confusion matrix on the test set (accuracy {100 * result['test_accuracy']:.2f}%)"
    run.log_figure(plots.confusion(cm.tolist(), CLASSES, title), "confusion_matrix.png")
    run.log_figure(plots.per_class(per_class, f"{spec.model}: precision, recall and F1 per class"), "per_class.png")
    run.log_dict({"temperature": result["temperature"], "ece": result["test_ece"], "ece_ts": result["test_ece_ts"],
                  "bins": bins}, "calibration.json")
    title = (f"{spec.model}: reliability on the test set (T = {result['temperature']:.2f} fitted on "
             "the validation split)")
    run.log_figure(plots.reliability({spec.model: bins}, title), "reliability.png")
    run.log_artifact(spec.paths.per_class)
    run.log_artifact(spec.paths.predictions)
