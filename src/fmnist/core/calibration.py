"""How far a model's probabilities can be trusted: ECE, Brier score, NLL, and temperature scaling.

Every function takes log-probabilities (N, 10), as ``engine.predict`` returns them (flip test-time
augmentation included), and the true labels. Temperature scaling (Guo et al., 2017) divides them by
one scalar T fitted on the validation split to minimise its NLL; it changes no prediction, only the
confidence. ECE is top-label with 15 equal-width bins, as in Guo et al. and Mukhoti et al. (2020).
"""

from __future__ import annotations

import math

import torch

N_BINS = 15


def nll(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class: a proper scoring rule, whatever loss trained the model."""
    return float(-logp.double().gather(1, labels.view(-1, 1)).mean())


def nll_se(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """The standard error of ``nll`` over these images (their sample sd / sqrt(n)): the interval of one
    run's NLL on this test set, which is all the noise one run can show."""
    per_image = -logp.double().gather(1, labels.view(-1, 1)).squeeze(1)
    return float(per_image.std() / math.sqrt(len(per_image))) if len(per_image) > 1 else math.nan


def brier(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label (0 to 2)."""
    p = logp.float().exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).float()
    return float(((p - onehot) ** 2).sum(1).mean())


def reliability(logp: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """One row per confidence bin, [lo, hi) and the last one [lo, 1]: the images in it, their mean
    top-label confidence and the fraction right. Empty bins have count 0 and no confidence or accuracy.

    The bin edges are torchmetrics' (``torch.linspace``, ``bucketize(right=True)``), but a confidence
    of exactly 1.0 (common in float32: any logit gap above ~17) falls in the last bin, as in Guo et al.
    and NumPy's histogram; torchmetrics 1.9 counts it in a sixteenth bin of its own
    (Lightning-AI/torchmetrics#3510)."""
    conf, pred = logp.float().exp().max(1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    bins = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.bincount(bins, weights=conf.double(), minlength=n_bins)
    right_sum = torch.bincount(bins, weights=right, minlength=n_bins)
    rows = []
    for b in range(n_bins):
        c = int(count[b])
        rows.append({"bin_lo": b / n_bins, "bin_hi": (b + 1) / n_bins, "count": c,
                     "confidence": float(conf_sum[b] / c) if c else None,
                     "accuracy": float(right_sum[b] / c) if c else None})
    return rows


def ece(logp: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between confidence and accuracy per bin."""
    rows = reliability(logp, labels, n_bins)
    n = sum(r["count"] for r in rows)
    return sum(r["count"] * abs(r["confidence"] - r["accuracy"]) for r in rows if r["count"]) / n


def scale(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """The log-probabilities of softmax(logp / T)."""
    return torch.log_softmax(logp.float() / temperature, dim=1)


def fit_temperature(logp: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """The T > 0 that minimises the NLL of ``scale(logp, T)`` on these (validation) images.

    The NLL is convex in 1/T, so it has one minimum: a bounded scalar search on log T (scipy's Brent)
    finds it in a few dozen evaluations, in double precision and without autograd. Where every image
    is right, the NLL falls as T -> 0 and has no minimum: the search ends near the lower bound."""
    from scipy.optimize import minimize_scalar

    x = logp.detach().double()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(x / math.exp(log_t), labels))

    found = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def scores(logp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL, ECE and Brier score of these log-probabilities."""
    return {"nll": nll(logp, labels), "ece": ece(logp, labels), "brier": brier(logp, labels)}
