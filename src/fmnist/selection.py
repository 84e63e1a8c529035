"""Which model is best: chosen on the validation split, never on the test set.

The report names the best model and the register stage makes it the registered ``champion`` by one
rule: the highest validation accuracy, ties broken by the lower validation NLL, then by name. The
validation split is scored as the test set is (flip test-time augmentation included) by the
evaluate stage (reports/eval/M/metrics.json: ``val_accuracy``, ``val_nll``). The test figures are
reported for every model but choose nothing, so they stay an unbiased estimate of the chosen one.
"""

from __future__ import annotations

from typing import Any, Mapping

KEYS = ("val_accuracy", "val_nll")  # what the rule reads from each model's evaluation metrics
RULE = "the highest validation accuracy (ties: the lower validation NLL, then the model's name)"


def rank(model: str, metrics: Mapping[str, Any]) -> tuple:
    """The sort key of one model, best first."""
    return -float(metrics["val_accuracy"]), float(metrics["val_nll"]), model


def ranked(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The models of ``{model: evaluation metrics}``, best first."""
    return sorted(metrics, key=lambda m: rank(m, metrics[m]))
