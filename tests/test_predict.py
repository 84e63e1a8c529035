"""`fmnist predict`: images in the dataset's format and others, and files that are not usable images."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from conftest import make_spec, train_config
from fmnist import checkpoint, cli
from fmnist.commands import predict
from fmnist.core import engine, losses, models
from fmnist.data.images import ImageError, load_image
from fmnist.data import CLASSES
from fmnist.data.loader import load_split, load_stats


@pytest.fixture
def trained(processed_dir: Path, tmp_path: Path) -> Path:
    """A linear model trained for a few epochs on the synthetic splits (a second or two)."""
    train, val, stats = (load_split("train", processed_dir), load_split("val", processed_dir),
                         load_stats(processed_dir))
    cfg = train_config(epochs=4, batch_size=32, lr=0.01, weight_decay=0.0, schedule="none", device="cpu",
                       precision="fp32")
    engine.seed_everything(0)
    model = models.build("linear")
    engine.fit(model, train, val, stats, cfg, losses.cross_entropy, seed=0, device=torch.device("cpu"))
    path = tmp_path / "linear.pt"
    checkpoint.save(path, model.cpu(), make_spec("linear"), stats, run_id=None, bf16=False)
    return path


def write_test_pngs(processed_dir: Path, folder: Path, n: int = 10) -> list[tuple[Path, int]]:
    """The first n test images as 28x28 grayscale PNGs, like the dataset's."""
    test = load_split("test", processed_dir)
    out = []
    for i in range(n):
        path = folder / f"test{i}.png"
        Image.fromarray(test.images[i].numpy(), "L").save(path)
        out.append((path, int(test.labels[i])))
    return out


def as_photo(src: Path, dst: Path) -> None:
    """A dark-on-light RGB JPEG, 10x larger, off-centre on a wide white canvas."""
    item = ImageOps.invert(Image.open(src).convert("L")).resize((280, 280), Image.Resampling.NEAREST).convert("RGB")
    canvas = Image.new("RGB", (420, 300), (255, 255, 255))
    canvas.paste(item, (30, 10))
    canvas.save(dst, quality=95)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: costs nothing to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_dataset_format_images_are_used_as_they_are(processed_dir, tmp_path):
    test = load_split("test", processed_dir)
    (path, _), = write_test_pngs(processed_dir, tmp_path, n=1)
    assert load_image(path).tobytes() == test.images[0].numpy().tobytes()


def test_predicts_the_class_of_test_images(trained, processed_dir, tmp_path):
    images = write_test_pngs(processed_dir, tmp_path)
    results = predict.predict(trained, [p for p, _ in images])
    right = sum(r["predicted"] == CLASSES[y] for r, (_, y) in zip(results, images))
    assert right >= 9
    for r in results:
        probs = [t["probability"] for t in r["top3"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert r["predicted"] == r["top3"][0]["class"]


def test_other_images_are_converted_like_the_dataset(trained, processed_dir, tmp_path):
    images = write_test_pngs(processed_dir, tmp_path)
    photos = []
    for path, _ in images:
        photos.append(tmp_path / f"{path.stem}.jpg")
        as_photo(path, photos[-1])
    converted = load_image(photos[0])
    original = torch.frombuffer(bytearray(Image.open(images[0][0]).tobytes()), dtype=torch.uint8).float()
    again = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8).float()
    assert converted.size == (28, 28) and converted.mode == "L"
    assert (again - original).abs().mean() < 25  # light-on-dark again, item filling the frame
    results = predict.predict(trained, photos)
    assert sum(r["predicted"] == CLASSES[y] for r, (_, y) in zip(results, images)) >= 8


def test_cli_prints_class_and_top3_and_json(trained, processed_dir, tmp_path, capsys):
    (path, y), = write_test_pngs(processed_dir, tmp_path, n=1)
    assert cli.main(["predict", str(trained), str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: {CLASSES[y]}") and line.count("%") == 3
    assert cli.main(["predict", "--json", str(trained), str(path)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(path) and result["predicted"] == CLASSES[y] and len(result["top3"]) == 3


@pytest.mark.parametrize("kind, content, message", [
    ("text", b"not an image, just text\n", "not an image"),
    ("empty", b"", "empty file"),
    ("huge", png_header(20000, 20000), "400,000,000 pixels"),
    ("over the limit", png_header(8000, 8000), "64,000,000 pixels"),
    ("truncated", "noise", "unreadable image"),
    ("missing", None, "no such file"),
], ids=["text", "empty", "huge", "over-limit", "truncated", "missing"])
def test_unusable_files_fail_fast_with_one_line(kind, content, message, trained, tmp_path, capsys):
    path = tmp_path / "input.png"
    if content == "noise":  # a real PNG cut in the middle of its pixel data
        Image.fromarray(torch.randint(0, 256, (64, 64), dtype=torch.uint8).numpy(), "L").save(path)
        path.write_bytes(path.read_bytes()[:-600])
    elif content is not None:
        path.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=message):
        load_image(path)
    assert time.perf_counter() - t0 < 1.0
    assert cli.main(["predict", str(trained), str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_test_index_prints_the_prediction_and_the_true_label(trained, processed_dir, workdir, capsys):
    (workdir / "data").mkdir()
    (workdir / "data/processed").symlink_to(processed_dir)
    test = load_split("test", processed_dir)
    assert cli.main(["predict", str(trained), "--test-index", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("test image 3: predicted ") and f", true {CLASSES[int(test.labels[3])]} (" in line
    assert cli.main(["predict", str(trained), "--test-index", "3", "--json"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert r["test_index"] == 3 and r["true"] == CLASSES[int(test.labels[3])] and len(r["top3"]) == 3
    assert (r["predicted"] == r["true"]) == (line.endswith(")") and "(correct)" in line)


@pytest.mark.parametrize("index", ["200", "-1", "10000"])
def test_test_index_out_of_range_names_the_valid_range(trained, processed_dir, workdir, capsys, index):
    (workdir / "data").mkdir()
    (workdir / "data/processed").symlink_to(processed_dir)  # 200 test images
    assert cli.main(["predict", str(trained), "--test-index", index]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--test-index {index}: the test split has 200 images; use an index in 0..199" in err


def test_a_model_is_named_by_its_checkpoint_or_its_name(trained, workdir, processed_dir, capsys):
    (workdir / "models").mkdir()
    (workdir / "models/linear.pt").write_bytes(trained.read_bytes())
    (path, _), = write_test_pngs(processed_dir, workdir, n=1)
    assert cli.main(["predict", "linear", str(path)]) == 0
    by_name = capsys.readouterr().out
    assert cli.main(["predict", "models/linear.pt", str(path)]) == 0
    assert capsys.readouterr().out == by_name
    assert cli.main(["predict", "resnet", str(path)]) == 1
    assert "models/resnet.pt: missing" in capsys.readouterr().err
    assert cli.main(["predict", "linear"]) == 1
    assert "give image files, or --test-index N" in capsys.readouterr().err
