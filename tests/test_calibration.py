"""core/calibration: NLL and Brier score by hand, ECE against torchmetrics, temperature scaling
recovering a known temperature."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from fmnist.core import calibration


def synthetic(n: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ N(0, spread^2) and labels drawn from softmax(z): softmax(z) is calibrated."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=g) * spread
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, labels


def torchmetrics_ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probs, labels))


def test_nll_and_brier_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1]])
    logp, labels = p.log(), torch.tensor([0, 1])
    assert calibration.nll(logp, labels) == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)
    # (0.3^2 + 0.2^2 + 0.1^2 = 0.14) and (0.5^2 + 0.6^2 + 0.1^2 = 0.62)
    assert calibration.brier(logp, labels) == pytest.approx((0.14 + 0.62) / 2)
    assert calibration.brier(torch.tensor([[0.0, -1e9, -1e9]]), torch.tensor([0])) == 0  # certain and right
    assert calibration.brier(torch.tensor([[0.0, -1e9, -1e9]]), torch.tensor([1])) == 2  # certain and wrong
    # the standard error of the mean NLL: two images, per-image NLLs a and b -> |a - b| / 2
    assert calibration.nll_se(logp, labels) == pytest.approx(abs(math.log(0.7) - math.log(0.4)) / 2)


@pytest.mark.parametrize("spread, miscalibration", [(1.0, 1.0), (1.0, 2.5), (4.0, 1.0), (4.0, 0.5)])
def test_ece_matches_torchmetrics(spread, miscalibration):
    """Random (spread 1: confidences across the bins) and confident (spread 4) predictions, calibrated
    or not (the logits multiplied by k != 1)."""
    z, labels = synthetic(20_000, spread)
    logp = torch.log_softmax(z * miscalibration, 1)
    assert logp.exp().max(1).values.lt(1).all()  # no confidence of exactly 1.0: see the test below
    ours = calibration.ece(logp, labels)
    assert ours == pytest.approx(torchmetrics_ece(logp.exp(), labels), abs=1e-6)
    assert (ours < 0.02) == (miscalibration == 1.0)  # a calibrated model scores near 0


def test_a_confidence_of_one_falls_in_the_last_bin():
    """float32 rounds a confidence to exactly 1.0 from a logit gap of ~17: torchmetrics 1.9 counts those
    in a sixteenth bin of their own; the last bin [14/15, 1] holds them here, as it does a confidence
    a hair below 1.0 in torchmetrics."""
    z, labels = synthetic(20_000, 12.0, seed=1)
    logp = torch.log_softmax(z, 1)
    probs = logp.exp()
    conf = probs.max(1).values
    assert conf.eq(1).sum() > 1000 and conf.lt(1).sum() > 1000
    below = torch.where(probs == 1, torch.tensor(1 - 2 ** -24), probs)  # the largest float32 below 1
    # abs 2e-5: torchmetrics sums each bin in float32, ~1e-5 off over ~18,000 confidences near 1
    assert calibration.ece(logp, labels) == pytest.approx(torchmetrics_ece(below, labels), abs=2e-5)
    assert calibration.ece(logp, labels) == pytest.approx(calibration.ece(below.log(), labels), abs=1e-7)
    rows = calibration.reliability(logp, labels)
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 20_000
    assert rows[-1]["count"] == int((conf >= torch.linspace(0, 1, 16)[14]).sum())

    # by hand: 0.95 right and 1.0 wrong share the last bin: |0.975 - 0.5| = 0.475; torchmetrics puts
    # them in two bins: (|0.95 - 1| + |1.0 - 0|) / 2 = 0.525
    probs = torch.tensor([[0.95, 0.05] + [0.0] * 8, [1.0] + [0.0] * 9])
    assert calibration.ece(probs.log(), torch.tensor([0, 1])) == pytest.approx(0.475)
    assert torchmetrics_ece(probs, torch.tensor([0, 1])) == pytest.approx(0.525)


def test_reliability_rows_by_hand():
    probs = torch.tensor([[0.55, 0.45], [0.58, 0.42], [0.9, 0.1]])
    probs = torch.cat([probs, torch.zeros(3, 8)], 1)
    rows = calibration.reliability(probs.log(), torch.tensor([0, 1, 0]))
    assert (rows[8]["bin_lo"], rows[8]["bin_hi"]) == (pytest.approx(8 / 15), pytest.approx(9 / 15))
    assert rows[8]["count"] == 2 and rows[8]["confidence"] == pytest.approx(0.565) and rows[8]["accuracy"] == 0.5
    assert rows[13]["count"] == 1 and rows[13]["accuracy"] == 1.0
    assert rows[0] == {"bin_lo": 0.0, "bin_hi": 1 / 15, "count": 0, "confidence": None, "accuracy": None}
    assert calibration.ece(probs.log(), torch.tensor([0, 1, 0])) == pytest.approx((2 * 0.065 + 0.1) / 3)


@pytest.mark.parametrize("k", [0.5, 2.0, 3.0])
def test_temperature_scaling_recovers_a_known_temperature(k):
    """Labels drawn from softmax(z); given log_softmax(k z), the NLL is least at T = k, which undoes k."""
    z, labels = synthetic(20_000, 3.0, seed=2)
    logp = torch.log_softmax(z * k, 1)
    t = calibration.fit_temperature(logp, labels)
    assert t == pytest.approx(k, rel=0.03)
    scaled = calibration.scale(logp, t)
    assert torch.equal(scaled.argmax(1), logp.argmax(1))  # no prediction changes
    assert torch.allclose(scaled.exp().sum(1), torch.ones(len(z)))
    assert calibration.nll(scaled, labels) <= calibration.nll(logp, labels)
    assert calibration.ece(scaled, labels) < 0.02 < calibration.ece(logp, labels)
    # the fitted T is the minimum: the NLL rises on either side of it
    nll = lambda temp: calibration.nll(calibration.scale(logp, temp), labels)  # noqa: E731
    assert nll(t) < nll(t * 1.02) and nll(t) < nll(t / 1.02)


def test_scores_name_the_three_figures():
    z, labels = synthetic(1_000, 2.0)
    logp = torch.log_softmax(z, 1)
    assert calibration.scores(logp, labels) == {"nll": calibration.nll(logp, labels),
                                                "ece": calibration.ece(logp, labels),
                                                "brier": calibration.brier(logp, labels)}
