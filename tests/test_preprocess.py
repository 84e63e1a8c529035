"""The preprocess stage on synthetic IDX files: split sizes, stratification, determinism,
statistics from the training split only, summary.json; and the real data end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REAL_DATA, REPO, idx_bytes, synthetic_images, write_raw
from fmnist import config
from fmnist.data import CLASSES, DataError
from fmnist.data.idx import IMAGE_MAGIC, LABEL_MAGIC, read_pair
from fmnist.commands import preprocess

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def cfg(*overrides: str) -> config.Config:
    return config.load(REPO / "params.yaml", overrides)


def load(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.pt", weights_only=True)


def raw_train(raw: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return read_pair(raw / TRAIN_IMAGES, raw / TRAIN_LABELS)


def write_train(raw: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    (raw / TRAIN_IMAGES).write_bytes(idx_bytes(images, IMAGE_MAGIC))
    (raw / TRAIN_LABELS).write_bytes(idx_bytes(labels, LABEL_MAGIC))


def test_split_sizes_and_summary(raw_dir, tmp_path):
    out = tmp_path / "processed"
    summary = preprocess.run(cfg(), raw=raw_dir, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "summary.json", "test.pt", "train.pt", "val.pt"]
    expected = {"train": (540, 54), "val": (60, 6), "test": (200, 20)}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for name, (count, per_class) in expected.items():
        assert summary[name] == {"count": count, "per_class": {c: per_class for c in CLASSES}}
        d = load(out, name)
        assert d["images"].dtype == torch.uint8 and d["images"].shape == (count, 28, 28)
        assert d["labels"].dtype == torch.int64 and d["labels"].shape == (count,)
        assert torch.bincount(d["labels"], minlength=10).tolist() == [per_class] * 10
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats) == {"mean", "std"} and 0 < stats["mean"] < 1 and 0 < stats["std"] < 1


def test_val_and_train_are_disjoint_cover_the_train_file_and_keep_pairs(raw_dir, tmp_path):
    out = tmp_path / "processed"
    preprocess.run(cfg(), raw=raw_dir, out=out)
    images, labels = raw_train(raw_dir)
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    both = torch.cat([train["index"], val["index"]])
    assert torch.equal(both.sort().values, torch.arange(len(labels)))  # disjoint, and together everything
    for split in (train, val):
        assert torch.equal(split["images"], images[split["index"]])
        assert torch.equal(split["labels"], labels[split["index"]])
    ti, tl = read_pair(raw_dir / "t10k-images-idx3-ubyte", raw_dir / "t10k-labels-idx1-ubyte")
    assert torch.equal(test["images"], ti) and torch.equal(test["labels"], tl)


def test_stratified_split_keeps_unbalanced_proportions(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=10, n_test=10)
    counts = [13 + 9 * c for c in range(10)]  # 13, 22, ..., 94: 535 images
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    write_train(raw, synthetic_images(labels), labels)
    summary = preprocess.run(cfg("data.val_fraction=0.2"), raw=raw, out=tmp_path / "processed")
    assert summary["val"]["count"] == round(535 * 0.2) == 107
    assert summary["train"]["count"] == 535 - 107
    for c, n in enumerate(counts):
        got = summary["val"]["per_class"][CLASSES[c]]
        assert abs(got - n * 0.2) < 1, (CLASSES[c], got, n * 0.2)
        assert summary["train"]["per_class"][CLASSES[c]] == n - got


def test_same_seed_same_bytes_other_seed_other_split(raw_dir, tmp_path):
    a, b, c = (tmp_path / x for x in "abc")
    preprocess.run(cfg(), raw=raw_dir, out=a)
    preprocess.run(cfg(), raw=raw_dir, out=b)
    for name in ("train.pt", "val.pt", "test.pt", "stats.json", "summary.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name  # DVC sees the same output

    preprocess.run(cfg("seed=7"), raw=raw_dir, out=c)
    assert not torch.equal(load(a, "val")["index"], load(c, "val")["index"])
    assert json.loads((a / "summary.json").read_text()) == json.loads((c / "summary.json").read_text())
    assert torch.equal(load(a, "test")["images"], load(c, "test")["images"])


def test_statistics_come_from_the_training_split_only(raw_dir, tmp_path):
    """The split depends on labels and seed only; make every validation image white and the
    statistics must not move."""
    first = tmp_path / "first"
    preprocess.run(cfg(), raw=raw_dir, out=first)
    val_idx = load(first, "val")["index"]
    images, labels = raw_train(raw_dir)
    images[val_idx] = 255
    write_train(raw_dir, images, labels)

    out = tmp_path / "processed"
    preprocess.run(cfg(), raw=raw_dir, out=out)
    assert torch.equal(load(out, "val")["index"], val_idx)
    assert bool((load(out, "val")["images"] == 255).all())
    train = load(out, "train")["images"].double() / 255
    stats = json.loads((out / "stats.json").read_text())
    assert stats == json.loads((first / "stats.json").read_text())
    assert stats["mean"] == pytest.approx(train.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(train.std().item(), abs=1e-6)
    assert abs(stats["mean"] - (images.double() / 255).mean().item()) > 0.01  # a leak would show


def test_disagreeing_counts_fail_before_reading_and_write_nothing(raw_dir, tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv

    labels = torch.arange(599) % 10
    (raw_dir / TRAIN_LABELS).write_bytes(idx_bytes(labels, LABEL_MAGIC))
    monkeypatch.setattr(tv, "read_image_file", lambda *a: pytest.fail("read before the headers were compared"))
    out = tmp_path / "processed"
    with pytest.raises(DataError) as e:
        preprocess.run(cfg(), raw=raw_dir, out=out)
    msg = str(e.value)
    assert str(raw_dir / TRAIN_IMAGES) in msg and "600 images" in msg
    assert str(raw_dir / TRAIN_LABELS) in msg and "599 labels" in msg
    assert not out.exists()


@pytest.mark.parametrize("damage", ["label-out-of-range", "truncated-test-images", "missing-test-labels"])
def test_bad_raw_file_writes_nothing(raw_dir, tmp_path, damage):
    out = tmp_path / "processed"
    preprocess.run(cfg(), raw=raw_dir, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if damage == "label-out-of-range":
        labels = torch.arange(600) % 10
        labels[599] = 12
        (raw_dir / TRAIN_LABELS).write_bytes(idx_bytes(labels, LABEL_MAGIC))
        bad, says = raw_dir / TRAIN_LABELS, "label 12 at index 599"
    elif damage == "truncated-test-images":
        bad = raw_dir / "t10k-images-idx3-ubyte"
        bad.write_bytes(bad.read_bytes()[:-784])
        says = "truncated"
    else:
        bad = raw_dir / "t10k-labels-idx1-ubyte"
        bad.unlink()
        says = "missing"
    with pytest.raises(DataError) as e:
        preprocess.run(cfg("seed=3"), raw=raw_dir, out=out)
    assert str(bad) in str(e.value) and says in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --------------------------------------------------------------------------- the real data

@pytest.mark.integration
def test_real_download_and_preprocess(tmp_path, monkeypatch):
    """Download (from the Debian copy, no network) + preprocess on the real Fashion-MNIST."""
    from fmnist.data import sources as src
    from fmnist.commands import download

    if not all((REAL_DATA / f"{f.name}.gz").is_file() for f in src.FILES):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REAL_DATA} is missing: CI must install it (apt-get install dataset-fashion-mnist)")
        pytest.skip(f"{REAL_DATA} not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.delenv("FMNIST_SOURCE", raising=False)
    monkeypatch.setattr(src, "LOCAL_COPIES", (str(REAL_DATA),))
    monkeypatch.setattr(src, "MIRRORS", ())  # the Debian copy or nothing: no network in tests

    raw = tmp_path / "raw"
    download.run(out=raw, progress=False)
    for f in src.FILES:  # decompressed and verified against the pinned sums
        assert (raw / f.name).stat().st_size == f.size

    summary = preprocess.run(cfg(), raw=raw, out=tmp_path / "processed")
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [54_000, 6_000, 10_000]
    assert summary["train"]["per_class"] == dict.fromkeys(CLASSES, 5_400)
    assert summary["val"]["per_class"] == dict.fromkeys(CLASSES, 600)
    assert summary["test"]["per_class"] == dict.fromkeys(CLASSES, 1_000)
    stats = json.loads((tmp_path / "processed" / "stats.json").read_text())
    assert stats["mean"] == pytest.approx(0.286, abs=0.002) and stats["std"] == pytest.approx(0.353, abs=0.002)
