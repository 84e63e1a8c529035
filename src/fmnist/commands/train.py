"""train@MODEL: fit one model; write models/MODEL.pt, its metrics and its history.

After every epoch the whole training state goes to .fmnist/resume/MODEL.pt, so
``fmnist train MODEL --resume`` (or ``FMNIST_RESUME=1 dvc repro``) continues an
interrupted run from its last finished epoch to the same final result. The file lies
outside the folders that stages depend on (models/, reports/), so the one an interrupted
run leaves behind changes no stage's dependencies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from fmnist import ConfigError, FmnistError, checkpoint
from fmnist.core import engine, losses, models
from fmnist.core.distributed import Group
from fmnist.data.loader import Split, input_stats, load_split, stratified_indices
from fmnist.files import remove_stale, torch_save, write_csv, write_json
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_s"]
RESUME_ENV = "FMNIST_RESUME"  # set to 1 to resume under `dvc repro`, where no flag can be passed


def resume_requested(flag: bool) -> bool:
    return flag or os.environ.get(RESUME_ENV, "").strip().lower() in ("1", "true", "yes")


def run(spec: RunSpec, *, resume: bool = False, progress: bool = True, group: Group | None = None) -> dict | None:
    """Train one model. In a process group every rank trains; only rank 0 writes, prints and logs, and
    only it returns the metrics."""
    tc, out = spec.train, spec.paths
    main = group is None or group.is_main
    device = engine.select_device(tc.device)
    if device.type == "cuda" and group is not None:
        device = torch.device("cuda", group.local_rank)
    engine.use_bf16(tc.precision, device)  # fails now, not after loading, if bf16 is impossible here
    train, val = _training_split(spec), load_split("val", out.processed)
    stats = input_stats(tc.input_scaling, out.processed)

    if main:
        remove_stale(*out.outputs())  # left by a run killed while writing
    state = _resume_state(spec, quiet=not main) if resume else None
    engine.seed_everything(spec.seed)
    model = models.build(spec.arch, spec.hparams)
    loss_fn = losses.make_loss(spec.loss, spec.focal, tc.label_smoothing)
    fit = functools.partial(engine.fit, model, train, val, stats, tc, loss_fn, seed=spec.seed, device=device,
                            resume=state, group=group)
    if not main:
        fit()
        return None

    from fmnist import tracking
    from fmnist.tracking import registry
    from fmnist.core.export import RawImageClassifier, example_input

    n_params = models.count_parameters(model)
    params = {**spec.trained_with(), "evaluate": dataclasses.asdict(spec.evaluate), "n_parameters": n_params}
    tags = {"recipe": spec.recipe, "fmnist.nproc": str(group.world if group else 1)}
    with tracking.start_run(spec.model, spec.loss, params, run_id=state and state.get("mlflow_run_id"),
                            tags=tags) as run:
        digest, source = data_digest(out.processed)
        for split, context in ((train, "train"), (val, "validation")):
            run.log_input("fashion-mnist", digest, source, context, len(split))

        def on_epoch(row: dict, snapshot) -> None:
            _print_epoch(row, tc.epochs)
            run.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "elapsed_s")}, step=int(row["epoch"]))
            torch_save(out.resume, {**snapshot(), "params_hash": spec.params_hash, "mlflow_run_id": run.run_id})

        result = fit(on_epoch=on_epoch, progress=_progress_bar(tc.epochs) if progress else None)
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
        written = (out.model, out.history, out.train_metrics)
        try:  # the outputs, then what MLflow keeps of them: all of it, or none of the outputs
            checkpoint.save(out.model, model.cpu(), spec, stats, bf16=result.bf16, run_id=run.run_id)
            write_csv(out.history, result.history, HISTORY_FIELDS)
            write_json(out.train_metrics, metrics)
            run.log_metrics({"train_time_s": result.train_time_s, "best_epoch": result.best_epoch,
                             "images_per_s": result.images_per_s})
            run.log_artifact(out.model)
            run.log_artifact(out.history)
            registry.log_model(run.run_id, RawImageClassifier(model, stats, spec.evaluate.tta_flip),
                               example_input(val.images))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    out.resume.unlink(missing_ok=True)
    return metrics


def launch(spec: RunSpec, nproc: int, argv: list[str], *, force: bool = False, backend: str = "auto") -> None:
    """Run ``fmnist train ARGV`` as ``nproc`` processes with torch.distributed's launcher (torchrun),
    on this machine. A failed worker stops the others; the error names the rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from fmnist.core import distributed

    device = engine.select_device(spec.train.device)
    distributed.backend_for(device, backend)
    devices, kind = (torch.cuda.device_count(), "GPUs") if device.type == "cuda" else (os.cpu_count(), "CPU cores")
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if nproc > (devices or 1) and not force:
        raise ConfigError(f"--nproc {nproc}: this machine has {devices} {kind}; more processes than that compete "
                          "for them (add --force to run anyway)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "--module", "fmnist", *argv])
    except ChildFailedError as e:
        first = e.get_first_failure()[1]
        how = (f"killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exit status {first.exitcode}")
        from fmnist import tracking

        tracking.reap_orphans(tracking.client(), spec.model)  # the run rank 0 could not close
        raise TrainingFailed(f"rank {first.local_rank} of {nproc} failed ({how}); the others were stopped and "
                             "nothing was written") from e


class TrainingFailed(FmnistError):
    """A worker of a distributed training failed."""


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
