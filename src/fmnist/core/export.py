"""A trained model as it leaves the lab: raw images in, class probabilities out.

``RawImageClassifier`` wraps a network with everything a caller would otherwise need from this
package: it takes images exactly as the data set holds them, ``(N, 28, 28)`` pixel values 0-255 as
float32, scales them as the network was trained (the checkpoint's normalisation), applies flip
test-time augmentation where the model is evaluated with it, and returns the 10 class
probabilities, calibrated by the temperature fitted on the validation split (the checkpoint keeps
the raw network and the temperature beside it). Exported with torch.export, it is a graph and weights: loading it runs no
pickled code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fmnist.data import IMAGE_SIZE, NUM_CLASSES
from fmnist.data.loader import Stats

EXAMPLE_BATCH = 4  # > 1, so that torch.export keeps the batch dimension dynamic


class RawImageClassifier(nn.Module):
    def __init__(self, net: nn.Module, stats: Stats, tta_flip: bool, temperature: float = 1.0):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(stats.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(stats.std, dtype=torch.float32))
        self.tta_flip = tta_flip
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch._assert_async(((images >= 0) & (images <= 255)).all(),
                            "pixel values must be numbers in [0, 255]: images are (N, 28, 28) float32, "
                            "as the data set holds them")
        x = (images.unsqueeze(1) / 255 - self.mean) / self.std
        logp = torch.log_softmax(self.net(x).float(), dim=1)  # log-probability outputs (FashionNet) work too
        if self.tta_flip:  # the mean probability of the image and its mirror, as the evaluate stage scores it
            logp = torch.logaddexp(logp, torch.log_softmax(self.net(x.flip(3)).float(), dim=1)) - math.log(2)
        return torch.softmax(logp / self.temperature, dim=1)


def example_input(images: torch.Tensor | None = None) -> torch.Tensor:
    """A few raw images, (EXAMPLE_BATCH, 28, 28) float32 in [0, 255]: real ones when given."""
    if images is not None:
        return images[:EXAMPLE_BATCH].float()
    return torch.linspace(0, 255, EXAMPLE_BATCH * IMAGE_SIZE * IMAGE_SIZE).view(EXAMPLE_BATCH, IMAGE_SIZE, IMAGE_SIZE)


OUTPUT_SHAPE = (-1, NUM_CLASSES)
INPUT_SHAPE = (-1, IMAGE_SIZE, IMAGE_SIZE)
