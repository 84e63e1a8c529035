"""IDX reading (fmnist.data.idx): good files, and every way a file can be wrong, each
reported with the file's name before the payload is touched."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch

from conftest import idx_bytes, synthetic_images
from fmnist.data import DataError
from fmnist.data.idx import IMAGE_MAGIC, LABEL_MAGIC, check_header, read_images, read_labels, read_pair


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    labels = torch.arange(30) % 10
    images = synthetic_images(labels)
    return (write(tmp_path / "images-idx3-ubyte", idx_bytes(images, IMAGE_MAGIC)),
            write(tmp_path / "labels-idx1-ubyte", idx_bytes(labels, LABEL_MAGIC)), images, labels)


@pytest.fixture
def no_torchvision_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if torchvision's readers are reached: the header check must refuse first."""
    import torchvision.datasets.mnist as tv

    def refuse(*args, **kwargs):
        raise AssertionError("torchvision's reader was called: the header check let a bad file through")

    monkeypatch.setattr(tv, "read_image_file", refuse)
    monkeypatch.setattr(tv, "read_label_file", refuse)


def test_good_files_read_exactly(pair):
    img_path, lab_path, images, labels = pair
    got_images, got_labels = read_pair(img_path, lab_path)
    assert got_images.dtype == torch.uint8 and got_images.shape == (30, 28, 28)
    assert got_labels.dtype == torch.int64 and got_labels.shape == (30,)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    assert check_header(img_path, IMAGE_MAGIC) == (30, 28, 28)
    assert check_header(lab_path, LABEL_MAGIC) == (30,)


def test_header_claiming_a_billion_images_is_refused_before_reading(tmp_path, no_torchvision_reader):
    # 16-byte header saying 10^9 images (784 GB), followed by one image's worth of bytes.
    path = write(tmp_path / "huge-idx3-ubyte", struct.pack(">4I", IMAGE_MAGIC, 10**9, 28, 28) + bytes(784))
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        read_images(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "1,000,000,000" in msg


def test_label_header_claiming_a_billion_labels_is_refused_before_reading(tmp_path, no_torchvision_reader):
    path = write(tmp_path / "huge-idx1-ubyte", struct.pack(">2I", LABEL_MAGIC, 10**9) + bytes(10))
    with pytest.raises(DataError, match="truncated") as e:
        read_labels(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("magic", [LABEL_MAGIC, 0x00000903, 0x1F8B0800, 0])
def test_wrong_magic_in_image_file(tmp_path, magic, no_torchvision_reader):
    images = synthetic_images(torch.arange(5) % 10)
    path = write(tmp_path / "images-idx3-ubyte", struct.pack(">4I", magic, 5, 28, 28) + images.numpy().tobytes())
    with pytest.raises(DataError, match="wrong magic number") as e:
        read_images(path)
    assert str(path) in str(e.value) and f"0x{magic:08x}" in str(e.value)


def test_image_file_given_as_labels_is_wrong_magic(pair, no_torchvision_reader):
    img_path, _, _, _ = pair
    with pytest.raises(DataError, match="wrong magic number") as e:
        read_labels(img_path)
    assert str(img_path) in str(e.value)


def test_gzipped_file_is_not_read_as_idx(tmp_path, no_torchvision_reader):
    import gzip

    path = write(tmp_path / "labels-idx1-ubyte", gzip.compress(idx_bytes(torch.arange(10), LABEL_MAGIC)))
    with pytest.raises(DataError, match="wrong magic number"):
        read_labels(path)


@pytest.mark.parametrize("keep", [16 + 784 * 3 - 1, 16 + 784, 15, 3, 0])
def test_truncated_image_file(pair, keep, no_torchvision_reader):
    img_path, _, _, _ = pair
    img_path.write_bytes(img_path.read_bytes()[:keep])
    with pytest.raises(DataError, match="truncated") as e:
        read_images(img_path)
    assert str(img_path) in str(e.value)


def test_truncated_label_file(pair, no_torchvision_reader):
    _, lab_path, _, _ = pair
    lab_path.write_bytes(lab_path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"truncated.*30 items") as e:
        read_labels(lab_path)
    assert str(lab_path) in str(e.value)


def test_trailing_bytes_are_refused(pair, no_torchvision_reader):
    img_path, _, _, _ = pair
    img_path.write_bytes(img_path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing bytes") as e:
        read_images(img_path)
    assert str(img_path) in str(e.value)


def test_images_of_the_wrong_size(tmp_path, no_torchvision_reader):
    path = write(tmp_path / "images-idx3-ubyte", idx_bytes(torch.zeros(4, 32, 32, dtype=torch.uint8), IMAGE_MAGIC))
    with pytest.raises(DataError, match="32x32, expected 28x28") as e:
        read_images(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("bad", [10, 255])
def test_label_out_of_range(tmp_path, bad):
    labels = torch.arange(20) % 10
    labels[13] = bad
    path = write(tmp_path / "labels-idx1-ubyte", idx_bytes(labels, LABEL_MAGIC))
    with pytest.raises(DataError) as e:
        read_labels(path)
    msg = str(e.value)
    assert str(path) in msg and f"label {bad} at index 13" in msg and "0..9" in msg


def test_image_and_label_counts_disagree(tmp_path):
    labels = torch.arange(12) % 10
    img = write(tmp_path / "images-idx3-ubyte", idx_bytes(synthetic_images(labels), IMAGE_MAGIC))
    lab = write(tmp_path / "labels-idx1-ubyte", idx_bytes(labels[:11], LABEL_MAGIC))
    with pytest.raises(DataError) as e:
        read_pair(img, lab)
    msg = str(e.value)
    assert str(img) in msg and str(lab) in msg and "12 images" in msg and "11 labels" in msg


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        read_images(tmp_path / "train-images-idx3-ubyte")
    assert "train-images-idx3-ubyte: missing" in str(e.value) and "download" in str(e.value)
