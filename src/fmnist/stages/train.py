"""train@MODEL: fit one architecture; write models/MODEL.pt, its metrics and history.

After every epoch the full training state goes to models/MODEL.resume.pt, so
``fmnist train MODEL --resume`` (or ``train.resume: true``) continues an
interrupted run from its last completed epoch with the same final result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fmnist import checkpoint, engine, losses, models
from fmnist.atomic import remove_stale, torch_save, write_csv, write_json
from fmnist.config import Config, ConfigError
from fmnist.data import PROCESSED_DIR
from fmnist.data.loader import load_split, load_stats, stratified_indices

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_s"]


def paths(name: str) -> dict[str, Path]:
    return {"model": Path("models") / f"{name}.pt", "resume": Path("models") / f"{name}.resume.pt",
            "metrics": Path("reports/train") / name / "metrics.json",
            "history": Path("reports/train") / name / "history.csv"}


def run(cfg: Config, name: str, resume: bool = False, progress: bool = True,
        processed: str | Path = PROCESSED_DIR) -> dict:
    mc = cfg.model(name)
    tc = mc.train
    out = paths(name)
    device = engine.select_device(tc.device)
    engine.use_bf16(tc.precision, device)  # fails now, not after loading, if bf16 is impossible here

    train, val, stats = load_split("train", processed), load_split("val", processed), load_stats(processed)
    if tc.subset:
        if tc.subset > len(train):
            raise ConfigError(f"{_key(cfg, name, 'subset')}: {tc.subset} is more than the "
                              f"{len(train)} training images; allowed: 0 (all) or 10..{len(train)}")
        train = train.take(stratified_indices(train.labels, tc.subset, torch.Generator().manual_seed(cfg.seed)))
    if tc.batch_size > len(train):
        raise ConfigError(f"{_key(cfg, name, 'batch_size')}: {tc.batch_size} is larger than the training split "
                          f"({len(train)} images); allowed: 1..{len(train)}")

    remove_stale(*out.values())  # left by a run killed while writing
    params_hash = cfg.params_hash(name)
    state = _resume_state(out["resume"], params_hash) if (resume or tc.resume) else None
    engine.seed_everything(cfg.seed)
    model = models.build(mc.arch, mc.hparams)
    n_params = models.count_parameters(model)
    loss_fn = losses.from_config(cfg, tc.label_smoothing)

    from fmnist import tracking

    run_params = {**cfg.run_params(name), "n_parameters": n_params}
    with tracking.start_run(name, cfg.loss, run_params, run_id=state and state.get("mlflow_run_id")) as run:
        def on_epoch(row: dict, snapshot) -> None:
            run.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "elapsed_s")}, step=int(row["epoch"]))
            torch_save(out["resume"], {**snapshot(), "params_hash": params_hash, "mlflow_run_id": run.run_id})

        result = engine.fit(model, train, val, stats, tc, loss_fn, seed=cfg.seed, device=device,
                            on_epoch=on_epoch, resume=state, progress=progress)
        best = result.history[result.best_epoch - 1] if tc.patience else result.history[-1]
        metrics = {
            "epochs": len(result.history), "best_epoch": result.best_epoch,
            "train_loss": best["train_loss"], "train_accuracy": best["train_accuracy"],
            "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
            "train_time_s": round(result.train_time_s, 2), "images_per_s": round(result.images_per_s, 1),
            "n_parameters": n_params, "n_train": len(train), "bf16": int(result.bf16),
        }
        checkpoint.save(out["model"], model.cpu(), name=name, arch=mc.arch, hparams=mc.hparams, stats=stats,
                        params=cfg.run_params(name), params_hash=params_hash, run_id=run.run_id, bf16=result.bf16)
        write_csv(out["history"], result.history, HISTORY_FIELDS)
        write_json(out["metrics"], metrics)
        run.log_metrics({"train_time_s": result.train_time_s, "best_epoch": result.best_epoch,
                         "images_per_s": result.images_per_s})
        run.log_artifact(out["model"])
        run.log_artifact(out["history"])
    out["resume"].unlink(missing_ok=True)
    return metrics


def _key(cfg: Config, name: str, field: str) -> str:
    """The params.yaml key that sets a model's ``train.<field>``: its own override, or the shared one."""
    own = (cfg.raw["models"][name] or {}).get("train") or {}
    return f"models.{name}.train.{field}" if field in own else f"train.{field}"


def _resume_state(path: Path, params_hash: str) -> dict | None:
    if not path.is_file():
        log.warning("resume: no %s; training from the start", path)
        return None
    state = checkpoint.load_file(path)
    if state.get("params_hash") != params_hash:
        log.warning("resume: %s was made with other params; training from the start", path)
        return None
    log.warning("resume: continuing from epoch %d of %s", state["epoch"], path)
    return state
