"""Reading IDX files, with every check made on the 16-byte header before the
payload is touched: a header that claims 10^9 images is refused, not allocated."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from fmnist.data import IMAGE_SIZE, NUM_CLASSES, DataError

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def check_header(path: Path, magic: int) -> tuple[int, ...]:
    """Validate magic number and declared shape against the file's actual size."""
    ndim = magic & 0xFF
    size = path.stat().st_size
    header_len = 4 * (1 + ndim)
    with open(path, "rb") as f:
        head = f.read(header_len)
    if len(head) < header_len:
        raise DataError(f"{path}: truncated, {size} bytes is shorter than the IDX header")
    (got,) = struct.unpack(">I", head[:4])
    if got != magic:
        kind = "image" if ndim == 3 else "label"
        raise DataError(f"{path}: wrong magic number 0x{got:08x}, expected 0x{magic:08x} for an IDX {kind} file")
    shape = struct.unpack(f">{ndim}I", head[4:])
    if ndim == 3 and shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected = header_len + int(torch.tensor(shape, dtype=torch.int64).prod())
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: the header declares {shape[0]:,} items ({expected:,} bytes) "
                        f"but the file has {size:,} bytes")
    return shape


def read_images(path: str | Path) -> torch.Tensor:
    """(N, 28, 28) uint8."""
    from torchvision.datasets.mnist import read_image_file

    path = Path(path)
    _exists(path)
    check_header(path, IMAGE_MAGIC)
    return read_image_file(str(path))


def read_labels(path: str | Path) -> torch.Tensor:
    """(N,) int64, each in 0..9."""
    from torchvision.datasets.mnist import read_label_file

    path = Path(path)
    _exists(path)
    check_header(path, LABEL_MAGIC)
    labels = read_label_file(str(path))
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"{path}: label {int(labels[i])} at index {i} is out of range 0..{NUM_CLASSES - 1}")
    return labels


def read_pair(images_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_images(images_path), read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images):,} images but {labels_path} has {len(labels):,} labels")
    return images, labels


def _exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro download` (or `fmnist download`) first")
