"""Cross-entropy and focal loss: focal reduces to cross-entropy, weights classes, stays finite when
the model is certain and under bf16 autocast, and log-probability models need no special case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


from fmnist.core import engine, losses, models
from fmnist.config import FocalConfig

from conftest import REPO, specs


def batch(n: int = 12, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g) * scale, torch.randint(0, 10, (n,), generator=g)


def focal_reference(scores: torch.Tensor, target: torch.Tensor, gamma: float, alpha) -> torch.Tensor:
    """The textbook formula, per sample, in float64."""
    p = F.softmax(scores.double(), dim=1).gather(1, target[:, None]).squeeze(1)
    a = torch.as_tensor(alpha, dtype=torch.float64)
    a = a[target] if a.dim() else a
    return -a * (1 - p) ** gamma * p.log()


def grad_of(fn, scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.clone().requires_grad_(True)
    loss = fn(s, target)
    loss.backward()
    return loss.detach(), s.grad


def test_focal_with_gamma_0_alpha_1_is_cross_entropy():
    scores, target = batch()
    ce, g_ce = grad_of(F.cross_entropy, scores, target)
    fl, g_fl = grad_of(lambda s, t: losses.focal_loss(s, t, gamma=0.0, alpha=1.0), scores, target)
    torch.testing.assert_close(fl, ce, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_fl, g_ce, rtol=1e-6, atol=1e-8)
    # ... also as params.yaml builds it, per sample
    fn = losses.make_loss("focal", FocalConfig(gamma=0.0, alpha=1.0))
    torch.testing.assert_close(fn(scores, target, reduction="none"), F.cross_entropy(scores, target, reduction="none"))


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_matches_the_formula_and_down_weights_easy_samples(gamma):
    scores, target = batch()
    got = losses.focal_loss(scores, target, gamma=gamma, reduction="none")
    torch.testing.assert_close(got.double(), focal_reference(scores, target, gamma, 1.0), rtol=1e-5, atol=1e-7)
    ce = F.cross_entropy(scores, target, reduction="none")
    assert (got <= ce + 1e-7).all() and (got < ce).any()
    assert losses.focal_loss(scores, target, gamma=gamma).item() == pytest.approx(got.mean().item(), rel=1e-6)


def test_focal_per_class_alpha_weights_each_sample_by_its_true_class():
    scores, target = batch(n=40)
    alpha = tuple(float(a) for a in torch.linspace(0.1, 1.9, 10))
    fn = losses.make_loss("focal", FocalConfig(gamma=2.0, alpha=alpha))
    per_sample = fn(scores, target, reduction="none")
    torch.testing.assert_close(per_sample.double(), focal_reference(scores, target, 2.0, alpha), rtol=1e-5, atol=1e-7)
    unweighted = losses.focal_loss(scores, target, gamma=2.0, reduction="none")
    torch.testing.assert_close(per_sample, unweighted * torch.tensor(alpha)[target])
    # a scalar alpha scales everything
    torch.testing.assert_close(losses.make_loss("focal", FocalConfig(2.0, 0.25))(scores, target),
                               0.25 * unweighted.mean())


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("magnitude", [1e4, 40.0, 6.0])
def test_focal_is_finite_for_confident_predictions(gamma, magnitude):
    # rows 0-4: certain and right (p_t -> 1, where (1 - p_t)^gamma with gamma < 1 has an infinite slope);
    # rows 5-9: certain and wrong (p_t -> 0)
    target = torch.arange(10)
    scores = torch.full((10, 10), -magnitude)
    scores[target[:5], target[:5]] = magnitude
    scores[target[5:], (target[5:] + 1) % 10] = magnitude
    loss, grad = grad_of(lambda s, t: losses.focal_loss(s, t, gamma=gamma), scores, target)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    right = losses.focal_loss(scores[:5], target[:5], gamma=gamma, reduction="none")
    assert (right >= 0).all() and (right < 1e-3).all()
    wrong = losses.focal_loss(scores[5:], target[5:], gamma=gamma, reduction="none")
    torch.testing.assert_close(wrong, torch.full((5,), 2 * magnitude), rtol=1e-4, atol=0)
    # where float64 can still tell p_t from 1, the loss agrees with the formula
    if magnitude == 6.0:
        torch.testing.assert_close(right.double(), focal_reference(scores[:5], target[:5], gamma, 1.0),
                                   rtol=3e-2, atol=0)  # float32 resolution near p_t = 1


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_losses_are_finite_under_bf16_autocast(name):
    cpu = torch.device("cpu")  # torch.autocast runs bf16 on any CPU (emulated where not native)
    torch.manual_seed(0)
    model = models.build("tinyvgg", {"hidden_units": 4})
    x, target = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    fn = losses.make_loss(name, FocalConfig(gamma=0.5, alpha=1.0))
    with engine.autocast(cpu, True):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = fn(out, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss.item() == pytest.approx(fn(model(x), target).item(), rel=0.05)
    # confident bf16 scores, both right and wrong
    s = torch.full((4, 10), -1e4, dtype=torch.bfloat16)
    s[0, 0] = s[1, 1] = s[2, 3] = s[3, 4] = 1e4
    s.requires_grad_(True)
    with engine.autocast(cpu, True):
        loss = fn(s, torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("name, kw", [("ce", {}), ("ce", {"label_smoothing": 0.1}),
                                      ("focal", {"focal": FocalConfig(2.0, 1.0)}),
                                      ("focal", {"focal": FocalConfig(1.5, tuple(0.5 + i / 10 for i in range(10)))})])
def test_log_softmax_model_gives_the_same_loss_as_its_logits(name, kw):
    torch.manual_seed(0)
    model = models.build("fashionnet", {"channels1": 4, "channels2": 8, "hidden": 16}).eval()
    x, target = torch.randn(8, 1, 28, 28), torch.arange(8)
    logits = model[:-1](x)  # the same network without its LogSoftmax
    logp = model(x)
    fn = losses.make_loss(name, kw.get("focal"), kw.get("label_smoothing", 0.0))
    torch.testing.assert_close(fn(logp, target), fn(logits, target))
    torch.testing.assert_close(fn(logp, target, reduction="none"), fn(logits, target, reduction="none"))


def test_label_smoothing_passes_through():
    scores, target = batch()
    spec = specs("loss=ce", "train.label_smoothing=0.1", params=REPO / "params.yaml")["mlp"]
    smooth = losses.make_loss(spec.loss, spec.focal, spec.train.label_smoothing)
    torch.testing.assert_close(smooth(scores, target), F.cross_entropy(scores, target, label_smoothing=0.1))
    plain = losses.make_loss(spec.loss, spec.focal)
    torch.testing.assert_close(plain(scores, target), F.cross_entropy(scores, target))
    assert smooth(scores, target).item() != pytest.approx(plain(scores, target).item(), rel=1e-3)
    torch.testing.assert_close(smooth(scores, target, reduction="sum"),
                               F.cross_entropy(scores, target, label_smoothing=0.1, reduction="sum"))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_focal_honours_label_smoothing(eps):
    scores, target = batch(n=30)
    # gamma 0, alpha 1 is cross-entropy with the same smoothing, value and gradient
    ce, g_ce = grad_of(lambda s, t: F.cross_entropy(s, t, label_smoothing=eps), scores, target)
    fl, g_fl = grad_of(lambda s, t: losses.focal_loss(s, t, gamma=0.0, label_smoothing=eps), scores, target)
    torch.testing.assert_close(fl, ce, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_fl, g_ce, rtol=1e-6, atol=1e-8)
    # gamma 2: the focal weight applies to every class's term of the smoothed target, per sample
    p = F.softmax(scores.double(), dim=1)
    q = torch.full_like(p, eps / 10).scatter_(1, target[:, None], 1 - eps + eps / 10)
    want = -(q * (1 - p) ** 2 * p.log()).sum(1)
    fn = losses.make_loss("focal", FocalConfig(gamma=2.0, alpha=1.0), label_smoothing=eps)
    torch.testing.assert_close(fn(scores, target, reduction="none").double(), want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(fn(scores, target), losses.focal_loss(scores, target, gamma=2.0))


def test_loss_is_chosen_by_params_yaml():
    scores, target = batch()
    spec = specs("loss=focal", "focal.gamma=2.0", "focal.alpha=0.5", params=REPO / "params.yaml")["mlp"]
    assert specs(params=REPO / "params.yaml")["mlp"].focal is None  # no focal settings under loss: ce
    torch.testing.assert_close(losses.make_loss(spec.loss, spec.focal)(scores, target).double(),
                               focal_reference(scores, target, 2.0, 0.5).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_loss("hinge")
    with pytest.raises(ValueError, match="params.yaml `focal:`"):  # no gamma or alpha of the code's own
        losses.make_loss("focal")
