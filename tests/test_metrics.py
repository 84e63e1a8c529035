"""Scores shared by evaluate and the report, on predictions small enough to check by hand."""

import torch

from fmnist.core import metrics
from fmnist.data import CLASSES


def test_confusion_matrix_rows_are_the_true_class():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = metrics.confusion_matrix(pred, target)
    assert cm.shape == (10, 10) and int(cm.sum()) == 6
    assert cm[0, :3].tolist() == [2, 1, 0] and cm[1, :3].tolist() == [0, 1, 1] and cm[2, :3].tolist() == [0, 0, 1]


def test_per_class_precision_recall_f1_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    s = metrics.per_class(pred, target)
    assert list(s) == list(CLASSES)
    c0, c1, c2 = (s[CLASSES[i]] for i in range(3))
    assert (c0["precision"], c0["recall"]) == (1.0, 2 / 3) and abs(c0["f1"] - 0.8) < 1e-12
    assert (c1["precision"], c1["recall"], c1["f1"]) == (0.5, 0.5, 0.5)
    assert (c2["precision"], c2["recall"]) == (0.5, 1.0) and abs(c2["f1"] - 2 / 3) < 1e-12
    assert s[CLASSES[9]] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # never seen, never predicted


def test_score_is_exact_over_every_sample():
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 0, 0])
    got = metrics.score(logp, labels)
    assert got["accuracy"] == 2 / 3
    assert abs(got["loss"] - float(-logp[:, 0].mean())) < 1e-6
