"""train@MODEL: fit one model; write models/MODEL.pt, its metrics and its history.

After every epoch the whole training state goes to models/MODEL.resume.pt, so
``fmnist train MODEL --resume`` (or ``FMNIST_RESUME=1 dvc repro``) continues an
interrupted run from its last finished epoch to the same final result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch

from fmnist import ConfigError, checkpoint
from fmnist.core import engine, losses, models
from fmnist.data.loader import Split, load_split, load_stats, stratified_indices
from fmnist.files import remove_stale, torch_save, write_csv, write_json
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_s"]
RESUME_ENV = "FMNIST_RESUME"  # set to 1 to resume under `dvc repro`, where no flag can be passed


def resume_requested(flag: bool) -> bool:
    return flag or os.environ.get(RESUME_ENV, "").strip().lower() in ("1", "true", "yes")


def run(spec: RunSpec, *, resume: bool = False, progress: bool = True) -> dict:
    tc, out = spec.train, spec.paths
    device = engine.select_device(tc.device)
    engine.use_bf16(tc.precision, device)  # fails now, not after loading, if bf16 is impossible here
    train, val = _training_split(spec), load_split("val", out.processed)
    stats = load_stats(out.processed)

    remove_stale(*out.outputs())  # left by a run killed while writing
    state = _resume_state(spec) if resume else None
    engine.seed_everything(spec.seed)
    model = models.build(spec.arch, spec.hparams)
    n_params = models.count_parameters(model)
    loss_fn = losses.make_loss(spec.loss, spec.focal, tc.label_smoothing)

    from fmnist import tracking

    params = {**spec.trained_with(), "evaluate": dataclasses.asdict(spec.evaluate), "n_parameters": n_params}
    with tracking.start_run(spec.model, spec.loss, params, run_id=state and state.get("mlflow_run_id")) as run:
        def on_epoch(row: dict, snapshot) -> None:
            _print_epoch(row, tc.epochs)
            run.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "elapsed_s")}, step=int(row["epoch"]))
            torch_save(out.resume, {**snapshot(), "params_hash": spec.params_hash, "mlflow_run_id": run.run_id})

        result = engine.fit(model, train, val, stats, tc, loss_fn, seed=spec.seed, device=device,
                            on_epoch=on_epoch, resume=state, progress=_progress_bar(tc.epochs) if progress else None)
        if result.stopped_early:
            log.info("early stop after epoch %d: no lower validation loss for %d epochs; keeping epoch %d",
                     len(result.history), tc.patience, result.best_epoch)
        kept = result.history[result.best_epoch - 1]
        metrics = {
            "epochs": len(result.history), "best_epoch": result.best_epoch,
            "train_loss": kept["train_loss"], "train_accuracy": kept["train_accuracy"],
            "val_loss": kept["val_loss"], "val_accuracy": kept["val_accuracy"],
            "train_time_s": round(result.train_time_s, 2), "images_per_s": round(result.images_per_s, 1),
            "n_parameters": n_params, "n_train": len(train), "bf16": int(result.bf16),
        }
        checkpoint.save(out.model, model.cpu(), spec, stats, bf16=result.bf16, run_id=run.run_id)
        write_csv(out.history, result.history, HISTORY_FIELDS)
        write_json(out.train_metrics, metrics)
        run.log_metrics({"train_time_s": result.train_time_s, "best_epoch": result.best_epoch,
                         "images_per_s": result.images_per_s})
        run.log_artifact(out.model)
        run.log_artifact(out.history)
    out.resume.unlink(missing_ok=True)
    return metrics


def _training_split(spec: RunSpec) -> Split:
    """The processed training split, or the stratified subset ``train.subset`` asks for."""
    train, tc = load_split("train", spec.paths.processed), spec.train
    if tc.subset > len(train):
        raise ConfigError(f"{spec.key('subset')}: {tc.subset} is more than the {len(train)} training images; "
                          f"allowed: 0 (all) or 10..{len(train)}")
    if tc.subset:
        train = train.take(stratified_indices(train.labels, tc.subset, torch.Generator().manual_seed(spec.seed)))
    if tc.batch_size > len(train):
        raise ConfigError(f"{spec.key('batch_size')}: {tc.batch_size} is larger than the training split "
                          f"({len(train)} images); allowed: 1..{len(train)}")
    return train


def _print_epoch(row: dict, epochs: int) -> None:
    """One line per epoch, so a long stage under `dvc repro` is never silent."""
    from tqdm.auto import tqdm

    tqdm.write(f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
               f"train_acc {row['train_accuracy']:.4f}  val_loss {row['val_loss']:.4f}  "
               f"val_acc {row['val_accuracy']:.4f}  lr {row['lr']:.3g}  {row['elapsed_s']:.1f}s", file=sys.stderr)


def _progress_bar(epochs: int) -> engine.Progress:
    from tqdm.auto import tqdm

    def bar(batches, epoch: int):
        return tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, mininterval=0.5, unit="batch")
    return bar


def _resume_state(spec: RunSpec) -> dict | None:
    path = spec.paths.resume
    if not path.is_file():
        log.warning("resume: no %s; training from the start", path)
        return None
    state = checkpoint.load_file(path)
    if state.get("params_hash") != spec.params_hash:
        log.warning("resume: %s was made with other params; training from the start", path)
        return None
    log.warning("resume: continuing from epoch %d of %s", state["state"]["epoch"], path)
    return state
