"""report: reports/report.md and reports/figures/*.png, from every model's train and eval outputs.

Reads, for each model of params.yaml's ``models:`` (the paths of its run spec):
reports/train/M/{metrics.json,history.csv}, reports/eval/M/{metrics.json,predictions.csv,per_class.json}
and, for the best convolutional model, models/M.pt (its first conv layer's kernels). The output depends on those files only: no
timestamps, so re-running on the same inputs writes identical files.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fmnist import FmnistError, checkpoint, plots
from fmnist.core import metrics, models
from fmnist.data import CLASSES
from fmnist.data.loader import load_split
from fmnist.files import save_figure, write_text
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")
FIGURE_NAMES = ("accuracy_time.png", "loss_curves.png", "confusion_best.png", "correct.png",
                "misclassified.png", "conv_kernels.png")

# Test accuracy published for these architectures: (arch, loss) -> accuracy; loss None = any loss.
PUBLISHED = {("linear", None): 0.8343, ("mlp", None): 0.7502, ("tinyvgg", None): 0.8806,
             ("mlp512", "ce"): 0.646, ("mlp512", "focal"): 0.678}
LOSS_NAMES = {"ce": "cross-entropy", "focal": "focal loss"}
N_CORRECT_PER_CLASS = 2
N_MISCLASSIFIED = 24


class ReportError(FmnistError):
    """An input of the report is missing or unreadable. The message names the file."""


def published(arch: str, loss: str) -> float | None:
    return PUBLISHED.get((arch, loss), PUBLISHED.get((arch, None)))


def _rank(row: dict[str, Any]) -> tuple:
    """Best first: higher test accuracy, then lower test loss, then by name."""
    return -row["test_accuracy"], row["test_loss"], row["model"]


# --------------------------------------------------------------------------- reading the inputs

def _need(path: Path) -> Path:
    if not path.is_file():
        raise ReportError(f"{path}: missing; run `dvc repro` (or `fmnist train MODEL` and "
                          "`fmnist evaluate MODEL` for each model of params.yaml) first")
    return path


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(_need(path).read_text())
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); run `dvc repro` to rebuild it") from e


def _csv(path: Path) -> list[dict[str, str]]:
    with open(_need(path), newline="") as f:
        return list(csv.DictReader(f))


def _model_row(spec: RunSpec) -> dict[str, Any]:
    """One model's numbers; every file it needs must exist."""
    p = spec.paths
    for path in (p.train_metrics, p.history, p.eval_metrics, p.predictions, p.per_class, p.model):
        _need(path)
    tm, em = _json(p.train_metrics), _json(p.eval_metrics)
    try:
        history = {k: [float(r[k]) for r in _csv(p.history)] for k in ("epoch", "train_loss", "val_loss")}
        row = {"model": spec.model, "arch": spec.arch, "loss": spec.loss, "n_parameters": int(tm["n_parameters"]),
               "epochs": int(tm["epochs"]), "train_time_s": float(tm["train_time_s"]),
               "images_per_s": float(tm["images_per_s"]), "test_accuracy": float(em["test_accuracy"]),
               "test_loss": float(em["test_loss"])}
    except (KeyError, ValueError, TypeError) as e:
        raise ReportError(f"{p.train_metrics.parent} or {p.eval_metrics.parent}: a metrics or history file lacks "
                          f"{e}; run `dvc repro` to rebuild them") from e
    row.update(published=published(spec.arch, spec.loss), spec=spec, history=history)
    return row


# --------------------------------------------------------------------------- the stage

def run(specs: dict[str, RunSpec]) -> Path:
    rows = [_model_row(spec) for spec in specs.values()]
    best = min(rows, key=_rank)
    for r in rows:
        r["best"] = r is best
    test = load_split("test", best["spec"].paths.processed)

    figures: dict[str, tuple[str, str]] = {}  # file name -> (heading, caption)

    def save(fig, fname: str, heading: str, caption: str) -> None:
        save_figure(FIGURES / fname, fig)
        figures[fname] = (heading, caption)

    by_acc = sorted(rows, key=_rank)
    save(plots.accuracy_and_time([{"model": r["model"], "accuracy": r["test_accuracy"],
                                   "published": r["published"], "train_time_s": r["train_time_s"],
                                   "best": r["best"]} for r in by_acc]),
         "accuracy_time.png", "Accuracy and training time",
         "Test accuracy (black bars: the published figure) and training time per model, best first.")

    losses = {r["loss"] for r in rows}
    loss_label = LOSS_NAMES.get(losses.pop(), "loss") if len(losses) == 1 else "loss"
    save(plots.loss_curves({r["model"]: r["history"] for r in rows}, loss_label),
         "loss_curves.png", "Loss curves", "Training and validation loss after each epoch, one panel per model.")

    preds = _csv(best["spec"].paths.predictions)
    save(plots.confusion(_confusion(preds), CLASSES,
                         f"{best['model']}: confusion matrix on the test set "
                         f"(accuracy {100 * best['test_accuracy']:.2f}%)"),
         "confusion_best.png", f"Confusion matrix of the best model ({best['model']})",
         "Rows: the true class; columns: the predicted class. Numbers are image counts.")

    pos = {int(i): p for p, i in enumerate(test.index.tolist())}
    save(_correct_grid(preds, test, pos, best["model"]), "correct.png",
         f"Correctly classified test images ({best['model']})",
         f"The first {N_CORRECT_PER_CLASS} correctly classified test images of each class, with the confidence.")
    save(_misclassified_grid(preds, test, pos, best["model"]), "misclassified.png",
         f"Misclassified test images ({best['model']})",
         f"The {N_MISCLASSIFIED} most confident mistakes: predicted class (red) and true class.")

    cnn = _best_cnn(rows)
    if cnn is not None:
        save(_kernels_figure(cnn, test), "conv_kernels.png", f"First conv layer of {cnn['model']}",
             "Each kernel of the best convolutional model's first layer (blue negative, red positive weights) "
             "above the feature map it makes of one test image (bright: strong response).")
    for stale in set(FIGURE_NAMES) - set(figures):
        (FIGURES / stale).unlink(missing_ok=True)

    per_class = _json(best["spec"].paths.per_class)
    write_text(REPORT, _markdown(rows, best, cnn, figures, per_class))
    log.info("wrote %s and %d figures in %s", REPORT, len(figures), FIGURES)
    return REPORT


# --------------------------------------------------------------------------- figures from the inputs

def _confusion(preds: list[dict[str, str]]) -> list[list[int]]:
    idx = {c: i for i, c in enumerate(CLASSES)}
    try:
        actual = torch.tensor([idx[r["actual"]] for r in preds])
        predicted = torch.tensor([idx[r["predicted"]] for r in preds])
    except KeyError as e:
        raise ReportError(f"predictions.csv: unknown class or column {e}; run `dvc repro` to rebuild it") from e
    return metrics.confusion_matrix(predicted, actual).tolist()


def _image(test, pos: dict[int, int], index: str):
    try:
        return test.images[pos[int(index)]].numpy()
    except (KeyError, ValueError) as e:
        raise ReportError(f"predictions.csv: index {index} is not in the test split; "
                          "run `dvc repro` to rebuild it") from e


def _correct_grid(preds, test, pos, model: str):
    picked: dict[str, list[dict[str, str]]] = {c: [] for c in CLASSES}
    for r in preds:
        if r["actual"] == r["predicted"] and len(picked[r["actual"]]) < N_CORRECT_PER_CLASS:
            picked[r["actual"]].append(r)
    chosen = [picked[c][k] for k in range(N_CORRECT_PER_CLASS) for c in CLASSES if len(picked[c]) > k]
    if not chosen:
        return plots.message(f"{model}: no test image was classified correctly")
    return plots.image_grid([_image(test, pos, r["index"]) for r in chosen],
                            [f"{r['predicted']}\n{100 * float(r['confidence']):.0f}% sure" for r in chosen],
                            [plots.GREEN] * len(chosen),
                            f"{model}: correctly classified test images (one column per class)", ncols=len(CLASSES))


def _misclassified_grid(preds, test, pos, model: str):
    wrong = sorted((r for r in preds if r["actual"] != r["predicted"]),
                   key=lambda r: (-float(r["confidence"]), int(r["index"])))[:N_MISCLASSIFIED]
    if not wrong:
        return plots.message(f"{model}: no test image was misclassified")
    return plots.image_grid([_image(test, pos, r["index"]) for r in wrong],
                            [f"predicted {r['predicted']}\ntrue {r['actual']}" for r in wrong],
                            [plots.RED] * len(wrong),
                            f"{model}: the most confident mistakes on the test set", ncols=8)


def _best_cnn(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most accurate model whose architecture has a conv layer (built, not trained, to check)."""
    for r in sorted(rows, key=_rank):
        if models.first_conv(models.build(r["arch"], r["spec"].hparams)) is not None:
            return r
    return None


@torch.no_grad()
def _kernels_figure(row: dict[str, Any], test):
    from fmnist.data.loader import normalize, to_float

    model, ck = checkpoint.load(row["spec"].paths.model)
    conv = models.first_conv(model)
    image = test.images[:1]
    x = normalize(to_float(image), ck.stats)
    maps = conv(x)[0]
    kernels = conv.weight.sum(dim=1)  # over input channels (one for grayscale input)
    caption = f"test image {int(test.index[0])} ({CLASSES[int(test.labels[0])]})"
    return plots.conv_kernels(kernels.numpy(), maps.numpy(), image[0].numpy(),
                              f"{row['model']}: the {len(kernels)} kernels of the first conv layer and "
                              "what each does to one test image", caption)


# --------------------------------------------------------------------------- markdown

def _markdown(rows, best, cnn, figures: dict[str, tuple[str, str]], per_class: dict[str, dict[str, float]]) -> str:
    loss_name = LOSS_NAMES.get(best["loss"], best["loss"])
    out = ["# Fashion-MNIST: model comparison", "",
           f"Best model: **{best['model']}** ({best['arch']}, {loss_name}), test accuracy "
           f"**{100 * best['test_accuracy']:.2f}%**, trained in {plots.seconds(best['train_time_s'])}.", "",
           "One row per model of `params.yaml`, in its order. Test metrics are on the 10,000 test images (the "
           "test loss is cross-entropy, whatever loss trained the model); training time is the training loop "
           "alone; *published* is the figure reported for that architecture, where one exists.", "",
           "| | model | architecture | parameters | loss | epochs | test accuracy | test loss | training time "
           "| images/s | published | vs published |",
           "|---|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        pub = r["published"]
        delta = f"{100 * (r['test_accuracy'] - pub):+.2f} pp" if pub is not None else ""
        name = f"**{r['model']}**" if r["best"] else r["model"]
        out.append(f"| {'★ best' if r['best'] else ''} | {name} | {r['arch']} | {r['n_parameters']:,} | {r['loss']} "
                   f"| {r['epochs']} | {100 * r['test_accuracy']:.2f}% | {r['test_loss']:.4f} "
                   f"| {plots.seconds(r['train_time_s'])} | {r['images_per_s']:,.0f} "
                   f"| {'' if pub is None else f'{100 * pub:.2f}%'} | {delta} |")
    out += ["", "pp: percentage points.", ""]
    if per_class:
        out += [f"## Per class ({best['model']})", "", "| class | precision | recall | F1 |", "|---|--:|--:|--:|"]
        out += [f"| {c} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |" for c, s in per_class.items()]
        out.append("")
    out += ["## Figures", ""]
    for fname, (heading, caption) in figures.items():
        out += [f"### {heading}", "", caption, "", f"![{heading}](figures/{fname})", ""]
    if cnn is None:
        out += ["No model in `params.yaml` has a convolutional layer, so there is no kernel figure.", ""]
    return "\n".join(out)
