"""evaluate@MODEL: test-set metrics, per-class scores and the confusion data of one trained model.

The model, its normalisation and its precision come from the checkpoint; how to evaluate
(``evaluate:`` in params.yaml: batch size, flip test-time augmentation) from the run spec, so
``dvc exp run -S evaluate.tta_flip=true`` re-runs evaluation without retraining anything.
"""

from __future__ import annotations

import logging

import torch

from fmnist import checkpoint
from fmnist.core import engine, metrics
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
    test = load_split("test", out.processed)
    device = select_device(spec.train.device)
    logp = engine.predict(model.to(device), test, ck.stats, batch_size=spec.evaluate.batch_size, device=device,
                          bf16=ck.bf16, tta_flip=spec.evaluate.tta_flip)
    scores = metrics.score(logp, test.labels)
    conf, pred = logp.exp().max(1)
    per_class = metrics.per_class(pred, test.labels)
    result = {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"],
              "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class)}

    remove_stale(out.eval_metrics, out.per_class, out.predictions)  # left by a run killed while writing
    write_csv(out.predictions, [
        {"index": int(i), "actual": CLASSES[a], "predicted": CLASSES[p], "confidence": round(float(c), 4)}
        for i, a, p, c in zip(test.index.tolist(), test.labels.tolist(), pred.tolist(), conf.tolist())])
    write_json(out.per_class, per_class)
    write_json(out.eval_metrics, result)
    _log_to_mlflow(spec, ck.run_id, result, per_class, metrics.confusion_matrix(pred, test.labels))
    return result


def _log_to_mlflow(spec: RunSpec, run_id: str | None, result: dict, per_class: dict, cm: torch.Tensor) -> None:
    from fmnist import plots, tracking

    run = tracking.existing_run(run_id)
    if run is None:
        log.warning("MLflow run %s (from the checkpoint) is not in %s; test metrics not logged there",
                    run_id, tracking.tracking_uri())
        return
    flat = dict(result)
    for cls, s in per_class.items():
        key = "".join(ch if ch.isalnum() else "_" for ch in cls).strip("_").lower()
        flat.update({f"{m}_{key}": v for m, v in s.items()})
    run.log_metrics(flat)
    run.log_dict({"classes": list(CLASSES), "rows_actual_cols_predicted": cm.tolist()}, "confusion_matrix.json")
    title = f"{spec.model}: confusion matrix on the test set (accuracy {100 * result['test_accuracy']:.2f}%)"
    run.log_figure(plots.confusion(cm.tolist(), CLASSES, title), "confusion_matrix.png")
    run.log_figure(plots.per_class(per_class, f"{spec.model}: precision, recall and F1 per class"), "per_class.png")
    run.log_artifact(spec.paths.per_class)
    run.log_artifact(spec.paths.predictions)
