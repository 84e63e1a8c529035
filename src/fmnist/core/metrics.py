"""Scores of a model's predictions: accuracy and loss, per-class precision/recall/F1, the
confusion matrix. Shared by the training core, the evaluate stage and the report.

Computed from the confusion matrix with a few tensor operations: torchmetrics gives the same
numbers but its import takes about 8 s on a 2-core machine, paid by every evaluate stage.
"""

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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(10, 10) counts; rows: the true class, columns: the predicted one."""
    return torch.bincount(target * NUM_CLASSES + pred, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)


def per_class(pred: torch.Tensor, target: torch.Tensor) -> dict[str, dict[str, float]]:
    """Class name -> precision, recall and F1 on these predictions (0 where undefined, as torchmetrics
    and scikit-learn give it)."""
    cm = confusion_matrix(pred, target).double()
    hits = cm.diag()
    precision = hits / cm.sum(0).clamp_min(1)
    recall = hits / cm.sum(1).clamp_min(1)
    f1 = 2 * hits / (cm.sum(0) + cm.sum(1)).clamp_min(1)  # = 2PR / (P + R)
    return {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i])}
            for i, c in enumerate(CLASSES)}
