"""Cross-entropy and focal loss.

Both start from ``log_softmax`` in float32. log-softmax is idempotent, so a
model that already outputs log-probabilities (FashionNet) gives the same loss
as one that outputs logits: this is the one place that handles both.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fmnist.config import Config, FocalConfig

LossFn = Callable[..., torch.Tensor]


def cross_entropy(scores: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    logp = F.log_softmax(scores.float(), dim=1)
    return F.nll_loss(logp, target, reduction=reduction) if label_smoothing == 0 else \
        F.cross_entropy(logp, target, label_smoothing=label_smoothing, reduction=reduction)


def focal_loss(scores: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | torch.Tensor = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss, -alpha_t (1 - p_t)^gamma log p_t (Lin et al., 2017).

    ``alpha`` is a scalar or one weight per class. gamma = 0 and alpha = 1 is
    exactly cross-entropy. ``1 - p_t`` is computed as ``-expm1(log p_t)`` and
    clamped away from 0 so the loss and its gradient stay finite when the model
    is certain (gamma < 1 would otherwise give 0 * inf).
    """
    logp = F.log_softmax(scores.float(), dim=1)
    logpt = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -logpt
    if gamma != 0:
        loss = loss * (-torch.expm1(logpt)).clamp_min(1e-12).pow(gamma)
    if isinstance(alpha, torch.Tensor):
        loss = loss * alpha.to(loss.device)[target]
    elif alpha != 1:
        loss = loss * alpha
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def make_loss(name: str, focal: FocalConfig, label_smoothing: float = 0.0) -> LossFn:
    """The training objective named by params.yaml's ``loss``."""
    if name == "ce":
        return lambda s, t, reduction="mean": cross_entropy(s, t, label_smoothing, reduction)
    if name == "focal":
        alpha = torch.tensor(focal.alpha) if isinstance(focal.alpha, tuple) else focal.alpha
        return lambda s, t, reduction="mean": focal_loss(s, t, focal.gamma, alpha, reduction)
    raise ValueError(f"unknown loss {name!r}")


def from_config(cfg: Config, label_smoothing: float = 0.0) -> LossFn:
    return make_loss(cfg.loss, cfg.focal, label_smoothing)
