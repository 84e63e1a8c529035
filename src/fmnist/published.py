"""What the source projects published: their figures, per architecture and loss, and what each showed.

The recipes they trained with are params, not facts: each model's ``published:`` entry in
params.yaml, which ``recipe: published`` trains with. A figure is compared with a run only when
the run used that recipe and the published architecture (same hyperparameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    source: str
    hparams: dict[str, Any]  # the architecture as published
    test_accuracy: float
    loss: float
    loss_kind: str  # what the loss figure measures: "test" or "validation"
    train_time_s: float | None = None  # on the source's own machine: shown as published, never as a ratio


@dataclass(frozen=True)
class Source:
    name: str
    models: tuple[str, ...]
    showed: str  # the figures it showed
    here: str  # where this project shows the same


COURSE = "course notebook (V0/V1/V2)"
COURSE_2 = "course, second author (Model 0/1/2)"
FFN_FOCAL = "FFN vs focal loss"
FASHIONNET = "FashionNet"
BN_PAIR = "FFN-BN vs CNN-BN"

# (architecture, loss) -> what was published for it.
FIGURES: dict[tuple[str, str], Figure] = {
    ("linear", "ce"): Figure(f"{COURSE}, V0", {"hidden": 10}, 0.8343, 0.4766, "test", 29.97),
    ("mlp", "ce"): Figure(f"{COURSE}, V1", {"hidden": 10}, 0.7502, 0.6850, "test", 32.10),
    ("tinyvgg", "ce"): Figure(f"{COURSE}, V2", {"hidden_units": 10}, 0.8806, 0.3239, "test", 37.13),
    ("mlp512", "ce"): Figure(FFN_FOCAL, {"hidden": 512}, 0.646, 1.1040, "validation"),
    ("mlp512", "focal"): Figure(FFN_FOCAL, {"hidden": 512}, 0.678, 0.5404, "validation"),
}

SOURCES = (
    Source(COURSE, ("linear", "mlp", "tinyvgg"), "test accuracy, test loss and training time of each model",
           "the tables above"),
    Source(COURSE_2, ("logistic", "mlp", "tinyvgg"), "a comparison bar chart; a grid of sample training images",
           "accuracy_time.png and data_samples.png"),
    Source(FFN_FOCAL, ("mlp512",), "final accuracy and validation loss with cross-entropy and with focal loss; "
           "training and validation loss curves; one test image with its predicted and true label",
           "the table above under each loss, loss_curves.png, `fmnist compare` (cross-entropy and focal curves "
           "side by side once both runs exist) and `fmnist predict mlp512 --test-index N`"),
    Source(FASHIONNET, ("fashionnet",), "loss and accuracy as training went; a grid of test images with "
           "predicted and true labels", "one line per epoch while it trains, loss_curves.png, and the grids of the "
           "best models"),
    Source(BN_PAIR, ("ffn_bn", "cnn_bn"), "loss curves of both; correct and incorrect examples of both; the CNN's "
           "first-layer kernels and what each does to an image", "loss_curves.png, the grids of the best fully "
           "connected model and the best CNN, and kernels_cnn_bn.png"),
)


def figure(arch: str, loss: str, hparams: dict[str, Any]) -> Figure | None:
    """The published figure for this architecture, loss and hyperparameters, if there is one."""
    f = FIGURES.get((arch, loss))
    return f if f is not None and dict(f.hparams) == dict(hparams) else None


OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}


def describe_recipe(recipe: dict[str, Any] | None, assumed: tuple[str, ...] = ()) -> str:
    """``SGD lr 0.1, batch 32, 3 epochs, [0, 1] inputs``; the settings the source did not publish marked *."""
    if not recipe:
        return "not published"

    def mark(key: str) -> str:
        return "*" if key in assumed else ""

    optimizer = OPTIMIZER_NAMES.get(recipe.get("optimizer"), recipe.get("optimizer"))
    parts = [f"{optimizer}{mark('optimizer')} lr {recipe.get('lr')}{mark('lr')}"]
    if recipe.get("schedule", "none") != "none":
        parts.append(f"{recipe['schedule']} schedule{mark('schedule')}")
    parts += [f"batch {recipe.get('batch_size')}{mark('batch_size')}", f"{recipe.get('epochs')} epochs{mark('epochs')}"]
    unit = recipe.get("input_scaling", "standard") == "unit"
    parts.append(("[0, 1] inputs" if unit else "standardised inputs") + mark("input_scaling"))
    return ", ".join(parts)
