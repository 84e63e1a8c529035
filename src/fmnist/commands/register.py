"""register: the pipeline's best model becomes a version of the MLflow registered model, and the
``champion`` if it beats the current one; reports/champion.json records what was done.

Reads reports/eval/M/metrics.json of every model of params.yaml (the validation figures that
choose, fmnist.selection, and the test accuracy, an informative tag) and the best model's
checkpoint (the MLflow run that trained it). Its one side effect is on the tracking store
(fmnist.tracking.registry): a run registered before is not registered again, so running the stage
twice on the same inputs changes nothing there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fmnist import FmnistError, checkpoint, selection
from fmnist.files import write_json
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

CHAMPION = Path("reports/champion.json")


class RegisterError(FmnistError):
    """An input of the register stage is missing or unreadable. The message names the file."""


def _metrics(spec: RunSpec) -> dict[str, float]:
    path = spec.paths.eval_metrics
    if not path.is_file():
        raise RegisterError(f"{path}: missing; run `dvc repro` (or `fmnist evaluate {spec.model}`) first")
    try:
        m = json.loads(path.read_text())
        return {k: float(m[k]) for k in (*selection.KEYS, "test_accuracy")}
    except (ValueError, KeyError, TypeError) as e:
        raise RegisterError(f"{path}: no number {e}; run `dvc repro` to rebuild it") from e


def run(specs: dict[str, RunSpec]) -> dict[str, Any]:
    from fmnist.tracking import registry, tracking_uri

    metrics = {name: _metrics(spec) for name, spec in specs.items()}
    best = selection.ranked(metrics)[0]
    spec, figures = specs[best], metrics[best]
    run_id = checkpoint.read(spec.paths.model)[0].run_id  # a missing or unreadable file: CheckpointError
    champ = registry.promote(spec, run_id, figures["val_accuracy"], figures["test_accuracy"])
    record = {"model": best, "run_id": run_id, "registered_model": registry.REGISTERED_MODEL,
              "version": champ.version, "alias": registry.ALIAS, "alias_moved": champ.moved,
              "alias_version": champ.alias_version, "chosen_on": "val_accuracy", **figures,
              "tracking_store": _kind(tracking_uri())}
    write_json(CHAMPION, record)
    log.info("wrote %s", CHAMPION)
    return record


def _kind(uri: str) -> str:
    """The kind of store (sqlite, http, postgresql...), not its address: the file is in git, and a
    path or host differs between machines (and may carry a password)."""
    return urlsplit(uri).scheme.split("+")[0] or uri  # "databricks" has no scheme
