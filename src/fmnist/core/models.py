"""Registry: architecture name -> ``nn.Module`` factory.

Every factory takes its hyperparameters as keyword arguments with defaults, so
params.yaml's ``models.<name>`` section is exactly its keyword arguments and the
registry can reject an unknown one before any work. Every model maps a batch of
``(N, 1, 28, 28)`` normalised images to ``(N, 10)`` scores: logits, or
log-probabilities for the models published that way (the losses apply
log-softmax, which leaves log-probabilities unchanged, so both kinds work with
every loss without a per-model case).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from fmnist import ConfigError
from fmnist.data import IMAGE_SIZE, NUM_CLASSES

IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE

REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    REGISTRY[fn.__name__] = fn
    return fn


def build(arch: str, hparams: dict[str, Any] | None = None) -> nn.Module:
    check_hparams(arch, hparams or {}, f"models.{arch}")
    return REGISTRY[arch](**(hparams or {}))


def check_hparams(arch: str, hparams: dict[str, Any], prefix: str) -> None:
    """Reject an unknown architecture, an unknown key or a value of the wrong type."""
    if arch not in REGISTRY:
        raise ConfigError(f"{prefix}: unknown architecture {arch!r}; allowed: {', '.join(REGISTRY)}")
    sig = inspect.signature(REGISTRY[arch])
    for key, value in hparams.items():
        if key not in sig.parameters:
            allowed = ", ".join(sig.parameters) or "none"
            raise ConfigError(f"{prefix}.{key}: unknown hyperparameter of {arch}; allowed: {allowed}")
        default = sig.parameters[key].default
        _check_like(value, default, f"{prefix}.{key}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_like(value: Any, default: Any, key: str) -> None:
    low = 0 if default == 0 else 1  # a size whose default is 0 (off) may stay off
    if isinstance(default, bool):
        ok, expect = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expect = _is_int(value) and value >= low, f"an integer >= {low}"
    elif isinstance(default, float):  # dropout probabilities
        ok, expect = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, \
            "a number in [0, 1)"
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 1 for v in value)
        expect = "a non-empty list of integers >= 1"
    else:
        ok, expect = True, ""
    if not ok:
        raise ConfigError(f"{key}: must be {expect}, got {value!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- layers the models share

class Dropout(nn.Dropout):
    """``nn.Dropout`` made about five times as cheap on the CPU, where ``bernoulli_`` draws one
    random double per element, serially (fashionnet's first dropout: 10.3 ms a step against 2.1 ms,
    a fifth of its bf16 step on 2 AMD EPYC cores). Here one 64-bit word from the same generator
    gives four elements their 16-bit uniform numbers, each kept where its number is at or above
    ``p``: the drop probability is ``p`` rounded to 1/65536, and kept elements are scaled by
    1 / (1 - p) as nn.Dropout does. Elsewhere (CUDA's fused kernel), in eval mode and for p of 0
    or 1 it is nn.Dropout itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or self.p in (0, 1) or self.inplace:
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


def _as_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


class Flatten(nn.Flatten):
    """``nn.Flatten`` that keeps a channels-last network channels-last in the backward pass too.
    Flattening a channels-last batch copies it into NCHW order, so its gradient comes back in NCHW;
    the max pool before it then converted both its input and that gradient on every step
    (fashionnet: 3.9 ms of a 43 ms bf16 step on 2 AMD EPYC cores). Here the gradient is put back
    into the input's memory format first, in one copy. The same values to the last bit: only where
    they lie in memory changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            x.register_hook(_as_channels_last)
        return super().forward(x)


# --------------------------------------------------------------------------- the published models

@register
def logistic() -> nn.Module:
    """Model 0 of the second course author: one linear layer, 784 -> 10 (multinomial logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_PIXELS, NUM_CLASSES))


@register
def linear(hidden: int = 10) -> nn.Module:
    """The linear baseline: two stacked linear layers, no non-linearity."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_PIXELS, hidden), nn.Linear(hidden, NUM_CLASSES))


@register
def mlp(hidden: int = 10) -> nn.Module:
    """Kept as published, with a ReLU after the output layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_PIXELS, hidden), nn.ReLU(),
                         nn.Linear(hidden, NUM_CLASSES), nn.ReLU())


@register
def mlp512(hidden: int = 512) -> nn.Module:
    """784-512-512-10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_PIXELS, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


@register
def tinyvgg(hidden_units: int = 10) -> nn.Module:
    """TinyVGG: 2 x [conv3x3-ReLU-conv3x3-ReLU-maxpool2], then one linear layer."""
    h = hidden_units

    def block(cin: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, h, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(h, h, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1), block(h), Flatten(), nn.Linear(h * 7 * 7, NUM_CLASSES))


@register
def fashionnet(channels1: int = 32, channels2: int = 64, hidden: int = 128,
               dropout1: float = 0.25, dropout2: float = 0.5) -> nn.Module:
    """Two convs, max pooling, dropout 0.25 / 0.5, two FC layers, log-softmax output."""
    return nn.Sequential(
        nn.Conv2d(1, channels1, 3), nn.ReLU(),
        nn.Conv2d(channels1, channels2, 3), nn.ReLU(), nn.MaxPool2d(2), Dropout(dropout1),
        Flatten(), nn.Linear(channels2 * 12 * 12, hidden), nn.ReLU(), Dropout(dropout2),
        nn.Linear(hidden, NUM_CLASSES), nn.LogSoftmax(dim=1),
    )


@register
def ffn_bn(widths: list[int] = (512, 256, 128, 64), dropout: float = 0.2) -> nn.Module:
    """Five fully connected layers of decreasing width; batch norm, ReLU and dropout after each but the last."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = IMAGE_PIXELS
    for w in widths:
        layers += [nn.Linear(cin, w), nn.BatchNorm1d(w), nn.ReLU(), Dropout(dropout)]
        cin = w
    layers.append(nn.Linear(cin, NUM_CLASSES))
    return nn.Sequential(*layers)


@register
def cnn_bn(channels: list[int] = (32, 64, 128), fc: list[int] = (256, 128), dropout: float = 0.3) -> nn.Module:
    """Three conv layers with batch norm and max pooling, three FC layers with dropout."""
    layers: list[nn.Module] = []
    cin, size = 1, 28
    for c in channels:
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        cin, size = c, size // 2
    layers.append(Flatten())
    fin = cin * size * size
    for w in fc:
        layers += [nn.Linear(fin, w), nn.ReLU(), Dropout(dropout)]
        fin = w
    layers.append(nn.Linear(fin, NUM_CLASSES))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- our own


class Whitening(nn.Conv2d):
    """A frozen 3x3 conv from one channel whose filters whiten the image's 3x3 patches: the leading
    eigenvectors of the patches' covariance, each divided by the square root of its eigenvalue, and
    each also negated, so the ReLU after it keeps both signs (the first layer of airbench, Keller
    Jordan's fast CIFAR-10 training). Nothing of it is learned: ``fit`` sets it from the training
    images before the first step (``init_from``), and the checkpoint carries it like any weight."""

    MAX_CHANNELS = 18  # 9 pixels in a 3x3 patch: 9 eigenvectors, each with its negative
    EPS = 1e-2  # added to each eigenvalue's square root: the flattest directions are not blown up

    def __init__(self, out_channels: int):
        super().__init__(1, out_channels, 3, padding=1, bias=False)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from(self, images: torch.Tensor) -> None:
        """``images``: (N, 1, 28, 28), normalised as the model sees them."""
        patches = F.unfold(images.float(), 3, padding=1).transpose(1, 2).reshape(-1, 9)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
        half = self.out_channels // 2
        filters = eigenvectors.T[-half:] / (eigenvalues[-half:].clamp_min(0).sqrt() + self.EPS)[:, None]
        self.weight.copy_(torch.cat([filters, -filters]).reshape(self.weight.shape).to(self.weight))


def data_initialised(model: nn.Module) -> list[nn.Module]:
    """The model's layers that ``fit`` sets from the training images before training: those with an
    ``init_from(images)`` method (fmnet's ``Whitening``)."""
    return [m for m in model.modules() if callable(getattr(m, "init_from", None))]


class _ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU; the first conv may be given."""

    def __init__(self, cin: int, cout: int, first: nn.Conv2d | None = None):
        super().__init__(
            first or nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


@register
def fmnet(widths: list[int] = (16, 32, 64), stem: int = 0, whiten: bool = False) -> nn.Module:
    """Our own: a small all-conv net in the style of airbench (an optional stem conv, three conv groups
    that each halve the resolution, global max pool, one linear layer), sized for a CPU: pooling
    right after each group's first conv keeps most of the work at 14x14 and below. ReLU, not
    GELU: the same accuracy here, and 10% faster on the CPU. ``whiten``: the first conv (the stem's,
    or the first group's) is a frozen ``Whitening`` of the image's patches, not a learned one."""
    n = stem or widths[0]  # the first conv's channels: the stem's, or the first group's
    if whiten and (n % 2 or n > Whitening.MAX_CHANNELS):
        raise ConfigError(f"models.fmnet.whiten: the whitened first conv needs an even number of channels, at most "
                          f"{Whitening.MAX_CHANNELS}; it has {n} (models.fmnet.{'stem' if stem else 'widths[0]'})")
    first = Whitening(n) if whiten else nn.Conv2d(1, n, 3, padding=1, bias=False)
    layers: list[nn.Module] = []
    if stem:  # 0: no stem, the first group's conv sees the image
        layers += [first, nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
    cin = stem or 1
    for i, w in enumerate(widths):
        layers.append(_ConvGroup(cin, w, first if i == 0 and not stem else None))
        cin = w
    layers += [nn.AdaptiveMaxPool2d(1), Flatten(), nn.Linear(cin, NUM_CLASSES, bias=False)]
    return nn.Sequential(*layers)


def uses_channels_last(model: nn.Module) -> bool:
    """Conv nets run faster in channels_last on oneDNN; pure MLPs gain nothing."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def worth_bf16(model: nn.Module) -> bool:
    """bf16 autocast pays for conv nets and for layers of 64k weights or more (tinyvgg about 2x,
    mlp512 1.2x on a CPU with AMX; 1.3x and 1.4x with AVX512_BF16 alone); for the 784-10-10 nets
    the casts cost more than the matmuls save (linear at batch 32: 82k images/s in fp32, 59k in
    bf16)."""
    return any(isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m.weight.numel() >= 65536)
               for m in model.modules())


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)

