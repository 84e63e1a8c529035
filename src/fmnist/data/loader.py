"""The processed splits in memory, and the batch loader the training core uses.

A split is one uint8 tensor of images and one int64 tensor of labels. Batches
are cut from them by index, converted, augmented and normalised as whole
batches: no per-sample Python, no PIL, no worker processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from fmnist import ConfigError
from fmnist.data import IMAGE_SIZE, NUM_CLASSES, PROCESSED_DIR, DataError
from fmnist.files import torch_load

if TYPE_CHECKING:
    from fmnist.core.distributed import Group

REBUILD = "run `dvc repro` (or `fmnist preprocess`) to rebuild it"


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64
    index: torch.Tensor  # (N,) int64: position in the original IDX file

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx], self.index[idx])


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``n`` items with the class proportions of ``labels``."""
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    # Largest-remainder apportionment, so the per-class counts add up to n exactly.
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    rest = n - int(take.sum())
    if rest:
        take[torch.argsort(exact - take, descending=True, stable=True)[:rest]] += 1
    chosen = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(take[c])]])
    return torch.cat(chosen).sort().values


def pixel_stats(images: torch.Tensor) -> Stats:
    """Mean and standard deviation of the pixels of uint8 ``images``, scaled to [0, 1]."""
    pixels = images.double().div_(255)
    return Stats(round(pixels.mean().item(), 6), round(pixels.std().item(), 6))


def load_split(name: str, root: str | Path = PROCESSED_DIR) -> Split:
    path = Path(root) / f"{name}.pt"
    d = torch_load(path, DataError, REBUILD)
    try:
        split = Split(d["images"], d["labels"], d["index"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not a processed split (no {e}); {REBUILD}") from e
    if not all(isinstance(t, torch.Tensor) for t in (split.images, split.labels, split.index)):
        raise DataError(f"{path}: does not hold tensors; {REBUILD}")
    n = len(split.labels)
    if (split.images.dtype != torch.uint8 or split.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
            or len(split.images) != n or split.labels.dtype != torch.int64 or len(split.index) != n):
        raise DataError(f"{path}: unexpected tensor shapes or types; {REBUILD}")
    return split


def input_stats(scaling: str, root: str | Path = PROCESSED_DIR) -> Stats:
    """The normalisation a model is trained with: the training split's mean and std (``standard``),
    or none (``unit``: pixels / 255 in [0, 1], as torchvision's ToTensor gives them)."""
    return load_stats(root) if scaling == "standard" else Stats(0.0, 1.0)


def load_stats(root: str | Path = PROCESSED_DIR) -> Stats:
    path = Path(root) / "stats.json"
    try:
        d = json.loads(path.read_text())
        return Stats(float(d["mean"]), float(d["std"]))
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; {REBUILD}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({e}); {REBUILD}") from e


# --------------------------------------------------------------------------- batch transforms

def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return images.to(device, non_blocking=True).unsqueeze(1).float().div_(255)


def normalize(x: torch.Tensor, stats: Stats) -> torch.Tensor:
    return x.sub_(stats.mean).div_(stats.std)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=g, device=g.device) < 0.5
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dx, dy) in [-max_shift, max_shift], filling with 0."""
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    dx = torch.randint(0, 2 * s + 1, (n,), generator=g, device=g.device).to(x.device)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * s)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, 1, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_erase(x: torch.Tensor, p: float, g: torch.Generator, scale: tuple[float, float] = (0.02, 0.2)) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p, zero one random rectangle per image."""
    n, _, h, w = x.shape
    dev = g.device
    area = torch.empty(n, device=dev).uniform_(*scale, generator=g) * h * w
    aspect = torch.exp(torch.empty(n, device=dev).uniform_(-1.1, 1.1, generator=g))  # log(1/3)..log(3)
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=g, device=dev) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g, device=dev) * (w - ew + 1)).long()
    on = torch.rand(n, generator=g, device=dev) < p
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    box = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1))
           & (xs >= left.view(n, 1, 1)) & (xs < (left + ew).view(n, 1, 1)) & on.view(n, 1, 1))
    return x.masked_fill(box.to(x.device).unsqueeze(1), 0.0)


class BatchLoader:
    """Iterate over a split in batches of normalised float tensors: ``(images, labels, n)``, where n
    is the size of the whole batch.

    ``shuffle`` and the augmentations draw from ``generator`` only, so a seeded
    generator makes the batch order and augmentations reproducible (and its
    state can be saved to resume mid-run). In a process ``group`` every rank draws the same
    batches and yields its own slice of each (n stays the whole batch's size).
    """

    CHUNK = 8192  # images prepared at once (25 MB as float32)

    def __init__(self, split: Split, batch_size: int, stats: Stats, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, flip: bool = False, shift: int = 0,
                 erase: float = 0.0, device: torch.device | str = "cpu", channels_last: bool = False,
                 group: Group | None = None):
        if (shuffle or flip or shift or erase) and generator is None:
            raise ValueError("shuffling or augmenting needs a generator")
        self.split, self.batch_size, self.stats = split, batch_size, stats
        self.shuffle, self.generator = shuffle, generator
        self.flip, self.shift, self.erase = flip, shift, erase
        self.device, self.channels_last, self.group = torch.device(device), channels_last, group
        if group is not None and 0 < len(split) % batch_size < group.world:
            raise ConfigError(f"train.batch_size: {batch_size} leaves a last batch of {len(split) % batch_size} "
                              f"images, too few for {group.world} processes; choose one that leaves 0 or at least "
                              f"{group.world}")

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        # Images are converted, augmented and normalised a chunk of batches at a time, and each
        # batch is a view into its chunk: at batch size 32 the per-batch tensor calls would
        # otherwise cost as much as a small model's training step.
        n, bs = len(self.split), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        per_chunk = max(1, self.CHUNK // bs) * bs
        for c0 in range(0, n, per_chunk):
            sl = slice(c0, min(c0 + per_chunk, n))
            idx = order[sl] if order is not None else sl
            x = to_float(self.split.images[idx], self.device)
            y = self.split.labels[idx].to(self.device, non_blocking=True)
            if self.flip:
                x = random_flip(x, self.generator)
            if self.shift:
                x = random_shift(x, self.shift, self.generator)
            if self.erase:
                x = random_erase(x, self.erase, self.generator)
            x = normalize(x, self.stats)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for b in range(0, len(y), bs):
                size = min(bs, len(y) - b)
                part = slice(b, b + size) if self.group is None else _offset(self.group.shard(size), b)
                yield x[part], y[part], size


def _offset(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)
