"""How far a model's probabilities can be trusted: ECE, Brier score, NLL, and temperature scaling.

Every function takes log-probabilities (N, 10), as ``engine.predict`` returns them (flip test-time
augmentation included), and the true labels. Temperature scaling (Guo et al., 2017) divides them by
one scalar T fitted on the validation split to minimise its NLL; it changes no prediction, only the
confidence. ECE is top-label with 15 equal-width bins, as in Guo et al. and Mukhoti et al. (2020).
"""

from __future__ import annotations

import torch

N_BINS = 15


def nll(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class: a proper scoring rule, whatever loss trained the model."""
    return float(-logp.float().gather(1, labels.view(-1, 1)).mean())


def brier(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label (0 to 2)."""
    p = logp.float().exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).float()
    return float(((p - onehot) ** 2).sum(1).mean())


def reliability(logp: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """One row per confidence bin ((lo, hi], the first one [0, hi]): the images in it, their mean
    top-label confidence and the fraction right. Empty bins have count 0 and no confidence or accuracy."""
    conf, pred = logp.float().exp().max(1)
    right = (pred == labels).float()
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # (lo, hi] as torchmetrics bins them
    count = torch.bincount(bins, minlength=n_bins).float()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
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


def fit_temperature(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of ``scale(logp, T)`` on these (validation) images.

    The NLL is convex in 1/T, so L-BFGS on log T finds the one minimum from T = 1."""
    x = logp.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def scores(logp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL, ECE and Brier score of these log-probabilities."""
    return {"nll": nll(logp, labels), "ece": ece(logp, labels), "brier": brier(logp, labels)}
