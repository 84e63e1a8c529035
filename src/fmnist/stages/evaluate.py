"""evaluate@MODEL: test-set metrics, per-class scores, confusion data, misclassified images."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fmnist import checkpoint, engine
from fmnist.atomic import remove_stale, write_csv, write_json
from fmnist.config import Config
from fmnist.data import CLASSES, PROCESSED_DIR
from fmnist.data.loader import load_split

log = logging.getLogger(__name__)


def paths(name: str) -> dict[str, Path]:
    d = Path("reports/eval") / name
    return {"metrics": d / "metrics.json", "per_class": d / "per_class.json",
            "predictions": d / "predictions.csv", "misclassified": d / "misclassified.csv"}


def per_class_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, dict[str, float]]:
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    kw = dict(num_classes=len(CLASSES), average="none")
    p, r, f = (fn(pred, target, **kw) for fn in (multiclass_precision, multiclass_recall, multiclass_f1_score))
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i])} for i, c in enumerate(CLASSES)}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(pred, target, num_classes=len(CLASSES))  # rows: actual


def run(cfg: Config, name: str, processed: str | Path = PROCESSED_DIR) -> dict:
    tc = cfg.model(name).train
    model_path = Path("models") / f"{name}.pt"
    model, ckpt = checkpoint.load(model_path)
    test = load_split("test", processed)
    device = engine.select_device(tc.device)
    logp = engine.predict(model.to(device), test, checkpoint.stats_of(ckpt), batch_size=tc.eval_batch_size,
                          device=device, bf16=bool(ckpt.get("bf16")), tta_flip=tc.tta_flip)
    scores = engine.score(logp, test.labels)
    conf, pred = logp.exp().max(1)
    per_class = per_class_scores(pred, test.labels)
    macro_f1 = sum(c["f1"] for c in per_class.values()) / len(per_class)
    metrics = {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"], "macro_f1": macro_f1}

    out = paths(name)
    remove_stale(*out.values())  # left by a run killed while writing
    rows = [{"index": int(i), "actual": CLASSES[a], "predicted": CLASSES[p], "confidence": round(float(c), 4)}
            for i, a, p, c in zip(test.index.tolist(), test.labels.tolist(), pred.tolist(), conf.tolist())]
    write_csv(out["predictions"], rows)
    write_csv(out["misclassified"], [r for r in rows if r["actual"] != r["predicted"]])
    write_json(out["per_class"], per_class)
    write_json(out["metrics"], metrics)
    _log_to_mlflow(ckpt.get("mlflow_run_id"), name, metrics, per_class, confusion_matrix(pred, test.labels), out)
    return metrics


def _log_to_mlflow(run_id: str | None, name: str, metrics: dict, per_class: dict, cm: torch.Tensor,
                   out: dict) -> None:
    from fmnist import plots, tracking

    run = tracking.existing_run(run_id)
    if run is None:
        log.warning("MLflow run %s (from the checkpoint) is not in %s; test metrics not logged there",
                    run_id, tracking.tracking_uri())
        return
    flat = dict(metrics)
    for cls, s in per_class.items():
        key = "".join(ch if ch.isalnum() else "_" for ch in cls).strip("_").lower()
        flat.update({f"{m}_{key}": v for m, v in s.items()})
    run.log_metrics(flat)
    run.log_dict({"classes": list(CLASSES), "rows_actual_cols_predicted": cm.tolist()}, "confusion_matrix.json")
    title = f"{name}: confusion matrix on the test set (accuracy {100 * metrics['test_accuracy']:.2f}%)"
    run.log_figure(plots.confusion(cm.tolist(), CLASSES, title), "confusion_matrix.png")
    run.log_figure(plots.per_class(per_class, f"{name}: precision, recall and F1 per class"), "per_class.png")
    run.log_artifact(out["per_class"])
    run.log_artifact(out["misclassified"])
