"""train@MODEL: fit one model; write models/MODEL.pt, its metrics and its history.

Read ``run`` top to bottom: build the model and choose where it trains, load the data, open its
MLflow run, fit (core/engine.py: one epoch is ``train_epoch`` then ``validate``), then write the
outputs and log the model. At the end of every epoch the whole training state goes to
.fmnist/resume/MODEL.pt, so ``fmnist train MODEL --resume`` (or ``FMNIST_RESUME=1 dvc repro``)
continues an interrupted run from its last finished epoch to the same final result. That file lies
outside the folders stages depend on, so one an interrupted run leaves behind changes no stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from fmnist import ConfigError, checkpoint
from fmnist.core import distributed, engine, losses, models
from fmnist.core.device import place
from fmnist.data.loader import Split, input_stats, load_split, stratified_indices
from fmnist.files import remove_stale, torch_save, write_csv, write_json
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_s"]
RESUME_ENV = "FMNIST_RESUME"  # set to 1 to resume under `dvc repro`, where no flag can be passed


def resume_requested(flag: bool) -> bool:
    return flag or os.environ.get(RESUME_ENV, "").strip().lower() in ("1", "true", "yes")


def run(spec: RunSpec, *, resume: bool = False, progress: bool = True, backend: str = "auto") -> dict | None:
    """Train one model. Under torchrun every process trains its share of each batch; only rank 0
    writes, prints and logs, and only it returns the metrics."""
    tc, out = spec.train, spec.paths
    with distributed.joined(tc.device, backend) as group:
        main = group is None or group.is_main
        # 1. the model, and where it trains (device and precision), chosen once
        engine.seed_everything(spec.seed)
        model = models.build(spec.arch, spec.hparams)
        where = place(tc.device, tc.precision, model, group.local_rank if group else None)
        # 2. the data
        train, val = _training_split(spec), load_split("val", out.processed)
        stats = input_stats(tc.input_scaling, out.processed)
        loss_fn = losses.make_loss(spec.loss, spec.focal, tc.label_smoothing)
        state = _resume_state(spec, quiet=not main) if resume else None
        if main:
            remove_stale(*out.outputs())  # left by a run killed while writing
        # 3. the MLflow run (rank 0 only)
        with _mlflow_run(spec, model, state, group) if main else contextlib.nullcontext() as mlflow_run:
            if main:
                _log_inputs(mlflow_run, spec, train, val)

            def end_of_epoch(row: dict, resume_state: dict) -> None:
                _print_epoch(row, tc.epochs)
                mlflow_run.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "elapsed_s")},
                                       step=int(row["epoch"]))
                torch_save(out.resume, {**resume_state, "params_hash": spec.params_hash,
                                        "mlflow_run_id": mlflow_run.run_id})

            # 4. fit
            result = engine.fit(model, train, val, stats, tc, loss_fn, seed=spec.seed, device=where.device,
                                bf16=where.bf16, resume=state, group=group, on_epoch=end_of_epoch if main else None,
                                progress=_progress_bar(tc.epochs) if progress and main else None)
            if not main:
                return None
            # 5. the outputs, and 6. the model as it leaves the lab, its probabilities calibrated on the
            # validation split: all of it, or none of the outputs
            temperature = engine.fit_temperature(model, val, stats, device=where.device, bf16=where.bf16,
                                                 tta_flip=spec.evaluate.tta_flip)
            try:
                metrics = _write_outputs(spec, model, result, stats, temperature, train, mlflow_run)
                _log_model(spec, model, stats, temperature, val, mlflow_run)
            except BaseException:
                for path in (out.model, out.history, out.train_metrics):
                    path.unlink(missing_ok=True)
                raise
    out.resume.unlink(missing_ok=True)
    return metrics


def _mlflow_run(spec: RunSpec, model: torch.nn.Module, state: dict | None, group: distributed.Group | None):
    """The model's MLflow run (the one an interrupted training began, when resuming), tagged with its
    cell: all that defines the run but the seed, so runs that differ only in seed group together."""
    from fmnist import tracking

    params = {**spec.trained_with(), "evaluate": dataclasses.asdict(spec.evaluate),
              "n_parameters": models.count_parameters(model)}
    tags = {"recipe": spec.recipe, "fmnist.cell": spec.cell, "fmnist.pair": spec.pair_key,
            "fmnist.nproc": str(group.world if group else 1)}
    return tracking.start_run(spec.model, spec.loss, params, run_id=state and state.get("mlflow_run_id"), tags=tags)


def _log_inputs(mlflow_run, spec: RunSpec, train: Split, val: Split) -> None:
    """The run's lineage: the data it trains and validates on."""
    digest, source = data_digest(spec.paths.processed)
    for split, context in ((train, "train"), (val, "validation")):
        mlflow_run.log_input("fashion-mnist", digest, source, context, len(split))


def _write_outputs(spec: RunSpec, model: torch.nn.Module, result: engine.FitResult, stats, temperature: float,
                   train: Split, mlflow_run) -> dict:
    """The checkpoint (the raw network, the temperature beside it), history and metrics, and the
    run's final metrics and artifacts."""
    out = spec.paths
    if result.stopped_early:
        log.info("early stop after epoch %d: no lower validation loss for %d epochs; keeping epoch %d",
                 len(result.history), spec.train.patience, result.best_epoch)
    kept = result.history[result.best_epoch - 1]
    metrics = {
        "epochs": len(result.history), "best_epoch": result.best_epoch,
        "train_loss": kept["train_loss"], "train_accuracy": kept["train_accuracy"],
        "val_loss": kept["val_loss"], "val_accuracy": kept["val_accuracy"],
        "train_time_s": round(result.train_time_s, 2), "images_per_s": round(result.images_per_s, 1),
        "n_parameters": models.count_parameters(model), "n_train": len(train), "bf16": int(result.bf16),
    }
    checkpoint.save(out.model, model.cpu(), spec, stats, bf16=result.bf16, run_id=mlflow_run.run_id,
                    temperature=temperature)
    write_csv(out.history, result.history, HISTORY_FIELDS)
    write_json(out.train_metrics, metrics)
    mlflow_run.log_metrics({"train_time_s": result.train_time_s, "best_epoch": result.best_epoch,
                            "images_per_s": result.images_per_s})
    mlflow_run.log_artifact(out.model)
    mlflow_run.log_artifact(out.history)
    return metrics


def _log_model(spec: RunSpec, model: torch.nn.Module, stats, temperature: float, val: Split, mlflow_run) -> None:
    """The MLflow Model: raw images in, calibrated class probabilities out (fmnist.core.export)."""
    from fmnist.core.export import RawImageClassifier, example_input
    from fmnist.tracking import registry

    registry.log_model(mlflow_run.run_id, RawImageClassifier(model, stats, spec.evaluate.tta_flip, temperature),
                       example_input(val.images))


def launch(spec: RunSpec, nproc: int, argv: list[str], *, force: bool = False, backend: str = "auto") -> None:
    """``fmnist ARGV`` (a train command) as ``nproc`` torchrun processes; a failed worker's MLflow run,
    which its rank 0 could not close, is marked KILLED."""
    try:
        distributed.launch(nproc, argv, spec.train.device, force=force, backend=backend)
    except distributed.WorkerFailed:
        from fmnist import tracking

        tracking.reap_orphans(tracking.client(), spec.model)
        raise


def data_digest(processed: Path) -> tuple[str, dict[str, str]]:
    """What the run trained on, for its lineage: DVC's hash of the processed data as dvc.lock records
    it when DVC runs the stage, else (by hand) the MD5 of the training split's file."""
    import hashlib

    import yaml

    lock = Path("dvc.lock")
    if os.environ.get("DVC_STAGE") and lock.is_file():
        for o in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("preprocess", {}).get("outs", []):
            if Path(o.get("path", "")) == processed and "md5" in o:
                return o["md5"], {"uri": str(processed), "hash": "dvc.lock (stage preprocess)"}
    md5 = hashlib.md5()
    with open(processed / "train.pt", "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest(), {"uri": str(processed / "train.pt"), "hash": "md5 of the file"}


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


def _resume_state(spec: RunSpec, quiet: bool = False) -> dict | None:
    path = spec.paths.resume
    say = log.debug if quiet else log.warning
    if not path.is_file():
        say("resume: no %s; training from the start", path)
        return None
    state = checkpoint.load_file(path)
    if state.get("params_hash") != spec.params_hash:
        say("resume: %s was made with other params; training from the start", path)
        return None
    say("resume: continuing from epoch %d of %s", state["state"]["epoch"], path)
    return state
