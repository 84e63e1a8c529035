"""Cross-entropy and focal loss.

Both start from ``log_softmax`` in float32. log-softmax is idempotent, so a
model that already outputs log-probabilities (FashionNet) gives the same loss
as one that outputs logits: this is the one place that handles both.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fmnist.config import FocalConfig

LossFn = Callable[..., torch.Tensor]


def cross_entropy(scores: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    logp = F.log_softmax(scores.float(), dim=1)
    return F.nll_loss(logp, target, reduction=reduction) if label_smoothing == 0 else \
        F.cross_entropy(logp, target, label_smoothing=label_smoothing, reduction=reduction)


def focal_loss(scores: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | torch.Tensor = 1.0, reduction: str = "mean",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Multi-class focal loss, -alpha_t (1 - p_t)^gamma log p_t (Lin et al., 2017).

    ``alpha`` is a scalar or one weight per class (that of the true class applies). With
    ``label_smoothing`` e the target is the smoothed distribution q (1 - e + e/K on the true
    class, e/K elsewhere) and the loss is -alpha_t sum_k q_k (1 - p_k)^gamma log p_k, so gamma = 0
    and alpha = 1 is exactly cross-entropy, with or without smoothing. ``1 - p`` is computed as
    ``-expm1(log p)`` and clamped away from 0 so the loss and its gradient stay finite when the
    model is certain (gamma < 1 would otherwise give 0 * inf).
    """
    logp = F.log_softmax(scores.float(), dim=1)
    if label_smoothing == 0:
        logp = logp.gather(1, target.unsqueeze(1))
    focus = (-torch.expm1(logp)).clamp_min(1e-12).pow(gamma) if gamma != 0 else 1.0
    terms = -focus * logp
    if label_smoothing == 0:
        loss = terms.squeeze(1)
    else:
        k = logp.shape[1]
        q = torch.full_like(logp, label_smoothing / k).scatter_(1, target.unsqueeze(1), 1 - label_smoothing + label_smoothing / k)
        loss = (q * terms).sum(1)
    if isinstance(alpha, torch.Tensor):
        loss = loss * alpha.to(loss.device)[target]
    elif alpha != 1:
        loss = loss * alpha
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def make_loss(name: str, focal: FocalConfig | None = None, label_smoothing: float = 0.0) -> LossFn:
    """The training objective named by params.yaml's ``loss`` (``focal`` holds its gamma and alpha,
    params.yaml's ``focal:``; a run spec has it when its loss is focal)."""
    if name == "ce":
        def ce(scores: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return cross_entropy(scores, target, label_smoothing, reduction)
        return ce
    if name == "focal":
        if focal is None:
            raise ValueError("the focal loss needs its gamma and alpha (params.yaml `focal:`)")
        alpha = torch.tensor(focal.alpha) if isinstance(focal.alpha, tuple) else focal.alpha

        def fl(scores: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return focal_loss(scores, target, focal.gamma, alpha, reduction, label_smoothing)
        return fl
    raise ValueError(f"unknown loss {name!r}")
