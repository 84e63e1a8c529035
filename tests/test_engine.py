"""The training core: optimizers, schedules, early stopping, batch augmentation, precision choice,
determinism, and exact evaluation. Small synthetic splits keep each test well under a second."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmnist.core import device, engine, losses, models
from fmnist.config import AugmentConfig, ConfigError, TrainConfig
from fmnist.data.loader import BatchLoader, Split, Stats, normalize, random_erase, random_flip, random_shift, to_float

from conftest import synthetic_images, train_config

STATS = Stats(0.2, 0.3)
CE = losses.make_loss("ce")


def make_split(n: int, seed: int = 0) -> Split:
    labels = torch.arange(n) % 10
    return Split(synthetic_images(labels, seed), labels, torch.arange(n))


TRAIN, VAL = make_split(100, seed=1), make_split(40, seed=2)


def cfg(**kw) -> TrainConfig:
    base = train_config(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                        schedule="none", device="cpu", precision="fp32")
    return dataclasses.replace(base, **kw)


def fit(*, arch: str = "linear", hparams: dict | None = None, model_seed: int = 0, seed: int = 0,
        **kw) -> tuple[torch.nn.Module, engine.FitResult]:
    """A model initialised from ``model_seed``, trained on TRAIN with ``cfg(**kw)`` and data seed ``seed``."""
    engine.seed_everything(model_seed)
    model = models.build(arch, hparams or {"hidden": 8})
    c = cfg(**kw)
    where = device.place(c.device, c.precision, model)  # as the train stage chooses, once
    result = engine.fit(model, TRAIN, VAL, STATS, c, CE, seed=seed, device=where.device, bf16=where.bf16)
    return model, result


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


def test_fit_sets_the_whitening_from_the_first_training_images_and_never_trains_it():
    hparams = {"widths": [8, 8, 8], "whiten": True}
    model, _ = fit(arch="fmnet", hparams=hparams, epochs=1, optimizer="adamw", lr=1e-2)
    want = models.build("fmnet", hparams)
    images = next(iter(BatchLoader(TRAIN, engine.INIT_IMAGES, STATS)))[0]  # all 100: fewer than INIT_IMAGES
    models.data_initialised(want)[0].init_from(images)
    got = models.data_initialised(model)[0].weight
    assert torch.equal(got, models.data_initialised(want)[0].weight)  # set from the data, then left alone


# --------------------------------------------------------------------------- optimizers and schedules

@pytest.mark.parametrize("optimizer, kw, cls", [
    ("sgd", {"momentum": 0.0, "weight_decay": 0.0}, torch.optim.SGD),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, torch.optim.SGD),
    ("adam", {"lr": 2e-3, "weight_decay": 1e-4}, torch.optim.Adam),
    ("adamw", {"lr": 2e-3, "weight_decay": 1e-2}, torch.optim.AdamW),
    ("rmsprop", {"lr": 1e-3, "momentum": 0.5, "weight_decay": 1e-4}, torch.optim.RMSprop),
])
def test_every_optimizer_is_built_as_configured_and_learns(optimizer, kw, cls):
    c = cfg(optimizer=optimizer, **kw)
    opt = engine.make_optimizer(models.build("linear"), c)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == c.lr and group["weight_decay"] == c.weight_decay
    if optimizer in ("sgd", "rmsprop"):
        assert group["momentum"] == c.momentum
    if optimizer == "sgd":
        assert group["nesterov"] == c.nesterov

    engine.seed_everything(0)
    model = models.build("linear", {"hidden": 8})
    before = [p.detach().clone() for p in model.parameters()]
    result = engine.fit(model, TRAIN, VAL, STATS, dataclasses.replace(c, epochs=3), CE, seed=0)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    h = result.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["val_loss"] < h[0]["val_loss"]


def expected_lr(c: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The documented shape of each schedule, stepped once per batch."""
    total = c.epochs * steps_per_epoch
    if c.schedule == "none":
        return c.lr
    if c.schedule == "step":
        return c.lr * c.step_gamma ** (step // (c.step_size * steps_per_epoch))
    if c.schedule == "cosine":
        return c.lr * (1 + math.cos(math.pi * step / total)) / 2
    # onecycle, linear: up from lr/25 to lr over the first quarter, then down to lr/25/1e4
    start, end, peak = c.lr / 25, c.lr / 25 / 1e4, 0.25 * total - 1
    if step <= peak:
        return start + (c.lr - start) * step / peak
    return c.lr + (end - c.lr) * (step - peak) / (total - 1 - peak)


@pytest.mark.parametrize("schedule", ["none", "step", "cosine", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_history_lr_follows_the_schedule(schedule, optimizer):
    kw = dict(schedule=schedule, optimizer=optimizer, epochs=5, lr=0.01, step_size=2, step_gamma=0.1)
    c = cfg(**kw)
    steps = math.ceil(len(TRAIN) / c.batch_size)  # 4: the last batch is short and still a step
    _, result = fit(**kw)
    lrs = [row["lr"] for row in result.history]
    want = [expected_lr(c, (e - 1) * steps, steps) for e in range(1, c.epochs + 1)]
    assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert len(set(lrs)) == (1 if schedule == "none" else 3 if schedule == "step" else 5)


# --------------------------------------------------------------------------- early stopping

@pytest.mark.parametrize("val_losses, patience, epochs, ran, best, stopped", [
    ([1.0, 0.5, 0.7, 0.6, 0.4, 0.3], 2, 6, 4, 2, True),  # two bad epochs after the best: stop
    ([1.0, 0.9, 1.0, 0.8, 1.1, 0.7], 2, 6, 6, 6, False),  # an improvement resets the count
    ([1.0, 0.5, 0.7, 0.6], 2, 4, 4, 2, False),  # the last epoch is bad: best weights still restored
    ([1.0, 0.5, 0.7, 0.6], 0, 4, 4, 4, False),  # patience 0: off, the last weights stay and count as kept
])
def test_early_stopping_stops_after_patience_and_restores_the_best(monkeypatch, val_losses, patience, epochs, ran,
                                                                   best, stopped):
    real_evaluate = engine.evaluate
    calls = iter(val_losses)

    def scripted(*args, **kwargs):  # the real accuracy, a scripted validation loss
        return {**real_evaluate(*args, **kwargs), "loss": next(calls)}

    monkeypatch.setattr(engine, "evaluate", scripted)
    weights = {}

    def on_epoch(row, snapshot):
        weights[row["epoch"]] = snapshot["model"]

    engine.seed_everything(0)
    model = models.build("linear", {"hidden": 8})
    result = engine.fit(model, TRAIN, VAL, STATS, cfg(epochs=epochs, patience=patience), CE, seed=0,
                        on_epoch=on_epoch)
    assert [r["epoch"] for r in result.history] == list(range(1, ran + 1)) == sorted(weights)
    assert [r["val_loss"] for r in result.history] == val_losses[:ran]
    assert result.best_epoch == best and result.stopped_early is stopped  # best_epoch: the weights kept
    final = model.state_dict()
    assert all(torch.equal(final[k], weights[best][k]) for k in final)
    assert not all(torch.equal(final[k], weights[ran if best != ran else 1][k]) for k in final)


# --------------------------------------------------------------------------- augmentation

def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` (C, H, W) moved down by dy and right by dx, zero-filled."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_random_shift_moves_each_image_by_its_own_drawn_offset():
    s = 2
    x = torch.rand(1, 1, 28, 28).add_(0.1).expand(400, 1, 28, 28).clone()
    out = random_shift(x, s, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    offsets = []
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                 if torch.equal(out[i], shifted(x[i], dy, dx))]
        assert len(match) == 1, f"image {i} is not a shift of its input by at most {s} pixels"
        offsets.append(match[0])
    assert len(set(offsets)) == (2 * s + 1) ** 2  # every offset gets drawn
    again = random_shift(x, s, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_flip_mirrors_about_half_of_the_batch():
    x = torch.rand(200, 1, 28, 28)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all()
    assert 60 < flipped.sum() < 140


def test_random_erase_zeroes_one_rectangle_per_image():
    x = torch.ones(100, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_erase(x, 0.0, g), x)  # p = 0: identity
    out = random_erase(x, 1.0, g)
    assert out.shape == x.shape and set(out.unique().tolist()) == {0.0, 1.0}
    for img in out[:, 0]:
        rows, cols = (img == 0).nonzero(as_tuple=True)
        assert len(rows) > 0
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == len(rows), "the erased pixels are not a rectangle"
        assert len(rows) <= 0.4 * 28 * 28
    some = random_erase(x, 0.5, g)
    erased = (some == 0).flatten(1).any(1)
    assert 20 < erased.sum() < 80


def test_loader_without_augmentation_is_the_normalised_split_and_shuffle_is_a_permutation():
    loader = BatchLoader(TRAIN, 32, STATS)
    xs, ys, ns = zip(*loader)
    assert [len(y) for y in ys] == list(ns) == [32, 32, 32, 4]
    torch.testing.assert_close(torch.cat(xs), normalize(to_float(TRAIN.images), STATS), rtol=0, atol=0)
    assert torch.equal(torch.cat(ys), TRAIN.labels)
    g = torch.Generator().manual_seed(0)
    aug = BatchLoader(TRAIN, 32, STATS, shuffle=True, generator=g, flip=True, shift=2, erase=0.5)
    ys = torch.cat([y for _, y, _ in aug])
    assert sorted(ys.tolist()) == sorted(TRAIN.labels.tolist()) and not torch.equal(ys, TRAIN.labels)


def test_loader_yields_every_image_of_a_split_larger_than_a_chunk():
    n = BatchLoader.CHUNK * 2 + 300
    big = Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8), torch.arange(n) % 10, torch.arange(n))
    sizes = [len(y) for _, y, _ in BatchLoader(big, 1000, STATS, shuffle=True, generator=torch.Generator())]
    assert sum(sizes) == n and sizes[-1] == n % 1000


def test_augmentation_changes_training_and_is_seeded():
    plain = without_time(fit(augment=AugmentConfig(flip=False, shift=0, erase=0.0))[1].history)
    aug = AugmentConfig(flip=True, shift=2, erase=0.3)
    a, b = (without_time(fit(augment=aug)[1].history) for _ in range(2))
    assert a == b and a != plain


# --------------------------------------------------------------------------- precision and device

@pytest.mark.parametrize("native, precision, want", [
    (True, "auto", True), (True, "bf16", True), (True, "fp32", False),
    (False, "auto", False), (False, "fp32", False), (False, "bf16", ConfigError),
])
def test_precision_selection(monkeypatch, native, precision, want):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    if want is ConfigError:
        with pytest.raises(ConfigError, match="train.precision"):
            device.use_bf16(precision, cpu)
        with pytest.raises(ConfigError, match="train.precision"):
            fit(precision=precision, epochs=1)
    else:
        assert device.use_bf16(precision, cpu) is want
        # bf16 runs emulated where it is not native
        _, result = fit(arch="tinyvgg", hparams={"hidden_units": 2}, precision=precision, epochs=1)
        assert result.bf16 is want and math.isfinite(result.history[0]["train_loss"])


@pytest.mark.parametrize("arch, hparams, want", [
    ("linear", {"hidden": 10}, False), ("mlp", {"hidden": 10}, False),
    ("mlp512", {"hidden": 512}, True), ("tinyvgg", {"hidden_units": 10}, True),
])
def test_auto_precision_keeps_tiny_fully_connected_nets_in_fp32(monkeypatch, arch, hparams, want):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    model = models.build(arch, hparams)
    assert device.use_bf16("auto", torch.device("cpu"), model) is want
    assert device.use_bf16("bf16", torch.device("cpu"), model) is True  # asked for explicitly: honoured


def test_native_bf16_probe_agrees_with_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " amx_bf16" in flags or " avx512_bf16" in flags:
        assert device.cpu_has_native_bf16()
    assert isinstance(device.cpu_has_native_bf16(), bool)


def test_device_selection():
    assert device.select_device("cpu") == torch.device("cpu")
    assert device.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            device.select_device("cuda")


# --------------------------------------------------------------------------- determinism

SMALL_CNN = {"channels": [4, 8, 8], "fc": [16, 16], "dropout": 0.3}  # batch norm, dropout: every RNG in use


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_same_seed_same_history_and_weights(precision):
    kw = dict(arch="cnn_bn", hparams=SMALL_CNN, precision=precision, optimizer="adamw", lr=3e-3,
              schedule="onecycle", augment=AugmentConfig(flip=True, shift=1, erase=0.2))
    (m1, r1), (m2, r2) = fit(**kw), fit(**kw)
    assert without_time(r1.history) == without_time(r2.history)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    m3, r3 = fit(model_seed=1, seed=1, **kw)
    assert without_time(r3.history) != without_time(r1.history)
    assert not torch.equal(m3.state_dict()["0.weight"], m1.state_dict()["0.weight"])
    _, r4 = fit(seed=1, **kw)  # the same initial weights, another data order and augmentation
    assert without_time(r4.history) != without_time(r1.history)


def test_non_finite_training_loss_stops_with_a_clear_error():
    engine.seed_everything(0)
    with pytest.raises(FloatingPointError, match="train.lr"):
        engine.fit(models.build("linear"), TRAIN, VAL, STATS, cfg(), lambda s, t: CE(s, t) * float("nan"),
                   seed=0)


# --------------------------------------------------------------------------- predict and score

def test_score_is_exact_per_sample_with_an_uneven_last_batch():
    torch.manual_seed(0)
    model = models.build("linear", {"hidden": 8}).eval()
    split = make_split(45, seed=3)
    logp = engine.predict(model, split, STATS, batch_size=20)
    assert logp.shape == (45, 10) and logp.dtype == torch.float32
    x = normalize(to_float(split.images), STATS)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logp, F.log_softmax(logits, 1))
    per_sample = F.cross_entropy(logits, split.labels, reduction="none")
    s = engine.score(logp, split.labels)
    assert s["loss"] == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert s["accuracy"] == (logits.argmax(1) == split.labels).sum().item() / 45
    batch_means = torch.stack([c.mean() for c in per_sample.split(20)]).mean().item()
    assert abs(batch_means - s["loss"]) > 1e-3  # what a mean of batch means would have reported
    assert engine.evaluate(model, split, STATS, batch_size=7) == pytest.approx(s, rel=1e-6)


def test_tta_flip_averages_the_probabilities_of_image_and_mirror():
    torch.manual_seed(0)
    model = models.build("tinyvgg", {"hidden_units": 4}).eval()
    with torch.no_grad():
        model[-1].weight.mul_(50)  # confident, and confident differently about an image and its mirror
    g = torch.Generator().manual_seed(4)
    split = Split(torch.randint(0, 256, (30, 28, 28), generator=g, dtype=torch.uint8), torch.arange(30) % 10,
                  torch.arange(30))
    logp = engine.predict(model, split, STATS, batch_size=16, tta_flip=True)
    x = normalize(to_float(split.images), STATS)
    with torch.no_grad():
        p, q = F.softmax(model(x), 1), F.softmax(model(x.flip(3)), 1)
    torch.testing.assert_close(logp.exp(), (p + q) / 2)
    assert ((p + q) / 2 - (p * q).sqrt()).abs().max() > 0.01  # not some other mean
    plain = engine.predict(model, split, STATS, batch_size=16)
    torch.testing.assert_close(plain.exp(), p)
