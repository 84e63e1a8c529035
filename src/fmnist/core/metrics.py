"""Scores of a model's predictions: accuracy and loss, per-class precision/recall/F1, the
confusion matrix. Shared by the training core, the evaluate stage and the report."""

from __future__ import annotations

import torch

from fmnist.core.losses import cross_entropy
from fmnist.data import CLASSES, NUM_CLASSES


def score(logp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Exact accuracy and cross-entropy over every sample (not a mean of batch means)."""
    n = len(labels)
    nll = cross_entropy(logp, labels, reduction="sum").item() / n
    acc = (logp.argmax(1) == labels).sum().item() / n
    return {"loss": nll, "accuracy": acc}


def per_class(pred: torch.Tensor, target: torch.Tensor) -> dict[str, dict[str, float]]:
    """Class name -> precision, recall and F1 on these predictions."""
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    kw = dict(num_classes=NUM_CLASSES, average="none")
    p, r, f = (fn(pred, target, **kw) for fn in (multiclass_precision, multiclass_recall, multiclass_f1_score))
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i])} for i, c in enumerate(CLASSES)}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(10, 10) counts; rows: the true class, columns: the predicted one."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(pred, target, num_classes=NUM_CLASSES)
