"""preprocess: IDX files -> train / val / test tensors, stats.json, summary.json."""

from __future__ import annotations

from pathlib import Path

import torch

from fmnist.config import Params
from fmnist.data import CLASSES, NUM_CLASSES, PROCESSED_DIR, RAW_DIR, DataError
from fmnist.data.idx import IMAGE_MAGIC, LABEL_MAGIC, check_header, read_pair
from fmnist.data.loader import Split, pixel_stats, stratified_indices
from fmnist.files import torch_save, write_json


def run(params: Params, raw: str | Path = RAW_DIR, out: str | Path = PROCESSED_DIR) -> dict:
    raw, out = Path(raw), Path(out)
    pairs = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for images, labels in pairs.values():  # every header checked before any payload is read
        n_img = check_header(raw / images, IMAGE_MAGIC)[0] if (raw / images).is_file() else None
        n_lab = check_header(raw / labels, LABEL_MAGIC)[0] if (raw / labels).is_file() else None
        if n_img is not None and n_lab is not None and n_img != n_lab:
            raise DataError(f"{raw / images} declares {n_img:,} images but {raw / labels} declares {n_lab:,} labels")
    full = {name: read_pair(raw / images, raw / labels) for name, (images, labels) in pairs.items()}

    images, labels = full["train"]
    g = torch.Generator().manual_seed(params.seed)
    n_val = round(len(labels) * params.data.val_fraction)
    val_idx = stratified_indices(labels, n_val, g)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_idx] = True
    train_idx = (~is_val).nonzero().squeeze(1)
    test_images, test_labels = full["test"]
    splits = {
        "train": Split(images[train_idx], labels[train_idx], train_idx),
        "val": Split(images[val_idx], labels[val_idx], val_idx),
        "test": Split(test_images, test_labels, torch.arange(len(test_labels))),
    }

    # Normalisation statistics from the training split only: nothing leaks from val or test.
    stats = pixel_stats(splits["train"].images)
    summary = {name: {"count": len(s),
                      "per_class": dict(zip(CLASSES, torch.bincount(s.labels, minlength=NUM_CLASSES).tolist()))}
               for name, s in splits.items()}

    for name, s in splits.items():
        torch_save(out / f"{name}.pt", {"images": s.images.contiguous(), "labels": s.labels.contiguous(),
                                        "index": s.index.contiguous()})
    write_json(out / "stats.json", {"mean": stats.mean, "std": stats.std})
    write_json(out / "summary.json", summary)
    return summary
