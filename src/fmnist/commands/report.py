"""report: reports/report.md and reports/figures/*.png, from every model's train and eval outputs.

Reads, for each model of params.yaml's ``models:`` (the paths of its run spec):
reports/train/M/{metrics.json,history.csv}, reports/eval/M/{metrics.json,predictions.csv,per_class.json};
the checkpoints of the models whose first conv layer it draws; the processed training and test
images. It compares a model with a published figure only when both used the same recipe
(src/fmnist/published.py). The output depends on those inputs only: no timestamps, so re-running
on the same inputs writes identical files.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fmnist import FmnistError, checkpoint, plots, published
from fmnist.core import metrics, models
from fmnist.data import CLASSES
from fmnist.data.loader import Split, load_split, normalize, to_float
from fmnist.files import save_figure, write_text
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")
LOSS_NAMES = {"ce": "cross-entropy", "focal": "focal loss"}
N_SAMPLES_PER_CLASS = 8
N_CORRECT_PER_CLASS = 2
N_MISCLASSIFIED = 24
KERNELS_OF = ("cnn_bn",)  # besides the best model: the CNN whose source showed its kernels


class ReportError(FmnistError):
    """An input of the report is missing or unreadable. The message names the file."""


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
    for path in (p.train_metrics, p.history, p.eval_metrics, p.predictions, p.per_class):
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
    has_conv = models.first_conv(models.build(spec.arch, spec.hparams)) is not None
    row.update(spec=spec, history=history, cnn=has_conv,
               published=published.figure(spec.arch, spec.loss, spec.hparams))
    return row


# --------------------------------------------------------------------------- the stage

def run(specs: dict[str, RunSpec]) -> Path:
    rows = sorted((_model_row(spec) for spec in specs.values()), key=_rank)
    best = rows[0]
    best_fc = next((r for r in rows if not r["cnn"]), None)
    best_cnn = next((r for r in rows if r["cnn"]), None)
    processed = best["spec"].paths.processed
    test = load_split("test", processed)
    figures: dict[str, tuple[str, str]] = {}  # file name -> (heading, caption)

    def save(fig, fname: str, heading: str, caption: str) -> None:
        save_figure(FIGURES / fname, fig)
        figures[fname] = (heading, caption)

    save(plots.accuracy_and_time([{"model": r["model"], "accuracy": r["test_accuracy"], "best": r is best,
                                   "published": r["published"].test_accuracy if _comparable(r) else None,
                                   "train_time_s": r["train_time_s"]} for r in rows]),
         "accuracy_time.png", "Accuracy and training time",
         "Test accuracy and training time per model, best first; a black mark is the figure its source "
         "published, where this run used the source's recipe.")
    save(plots.loss_curves({r["model"]: r["history"] for r in _in_params_order(rows, specs)},
                           {r["model"]: _loss_name(r["spec"]) for r in rows}),
         "loss_curves.png", "Loss curves",
         "Training loss (the loss each model trained on) and validation loss (always cross-entropy) per epoch.")
    save(_samples(load_split("train", processed)), "data_samples.png", "The data",
         f"The first {N_SAMPLES_PER_CLASS} training images of each class.")
    preds = {r["model"]: _csv(r["spec"].paths.predictions) for r in {id(r): r for r in (best, best_fc, best_cnn)
                                                                      if r is not None}.values()}
    save(plots.confusion(_confusion(preds[best["model"]]), CLASSES,
                         f"{best['model']}: confusion matrix on the test set "
                         f"(accuracy {100 * best['test_accuracy']:.2f}%)"),
         "confusion_best.png", f"Confusion matrix of the best model ({best['model']})",
         "Rows: the true class; columns: the predicted class. Numbers are image counts.")
    pos = {int(i): p for p, i in enumerate(test.index.tolist())}
    for kind, r in (("fully connected", best_fc), ("convolutional", best_cnn)):
        if r is None:
            continue
        m = r["model"]
        save(_correct_grid(preds[m], test, pos, m), f"correct_{m}.png",
             f"Correctly classified test images (best {kind} model, {m})",
             f"The first {N_CORRECT_PER_CLASS} correctly classified test images of each class, with the confidence.")
        save(_misclassified_grid(preds[m], test, pos, m), f"misclassified_{m}.png",
             f"Misclassified test images (best {kind} model, {m})",
             f"The {N_MISCLASSIFIED} most confident mistakes: the predicted class in red above the true class "
             "in green.")
    for r in _kernel_rows(rows, best):
        save(_kernels_figure(r, test), f"kernels_{r['model']}.png", f"First conv layer of {r['model']}",
             "Each kernel of the first conv layer (blue negative, red positive weights) above the feature map "
             "it makes of one test image; all feature maps share one colour scale.")
    for stale in {p.name for p in FIGURES.glob("*.png")} - set(figures):
        (FIGURES / stale).unlink()

    per_class = _json(best["spec"].paths.per_class)
    write_text(REPORT, _markdown(_in_params_order(rows, specs), best, figures, per_class))
    log.info("wrote %s and %d figures in %s", REPORT, len(figures), FIGURES)
    from fmnist.tracking import registry  # the best model becomes a version of the registered model (not an output)

    registry.promote(best["spec"], checkpoint.read(_need(best["spec"].paths.model))[0].run_id, best["test_accuracy"])
    return REPORT


def _loss_name(spec: RunSpec) -> str:
    smoothing = spec.train.label_smoothing
    return LOSS_NAMES[spec.loss] + (f", smoothed {smoothing:g}" if smoothing else "")


def _in_params_order(rows: list[dict[str, Any]], specs: dict[str, RunSpec]) -> list[dict[str, Any]]:
    by_name = {r["model"]: r for r in rows}
    return [by_name[name] for name in specs]


def _comparable(row: dict[str, Any]) -> bool:
    """A published figure is compared only with a run of the same recipe and architecture."""
    return row["published"] is not None and row["spec"].recipe == "published"


def _kernel_rows(rows: list[dict[str, Any]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """The best model's first conv layer (or the best CNN's, when the best has none), and cnn_bn's."""
    first = best if best["cnn"] else next((r for r in rows if r["cnn"]), None)
    chosen = [first] if first is not None else []
    return chosen + [r for r in rows if r["model"] in KERNELS_OF and r["cnn"] and r is not first]


# --------------------------------------------------------------------------- figures from the inputs

def _confusion(preds: list[dict[str, str]]) -> list[list[int]]:
    idx = {c: i for i, c in enumerate(CLASSES)}
    try:
        actual = torch.tensor([idx[r["actual"]] for r in preds])
        predicted = torch.tensor([idx[r["predicted"]] for r in preds])
    except KeyError as e:
        raise ReportError(f"predictions.csv: unknown class or column {e}; run `dvc repro` to rebuild it") from e
    return metrics.confusion_matrix(predicted, actual).tolist()


def _image(test: Split, pos: dict[int, int], index: str):
    try:
        return test.images[pos[int(index)]].numpy()
    except (KeyError, ValueError) as e:
        raise ReportError(f"predictions.csv: index {index} is not in the test split; "
                          "run `dvc repro` to rebuild it") from e


def _samples(train: Split):
    """The first training images of each class, one row per class, named at the row's start."""
    images, captions = [], []
    for c, name in enumerate(CLASSES):
        idx = (train.labels == c).nonzero().squeeze(1)[:N_SAMPLES_PER_CLASS]
        images += [train.images[i].numpy() for i in idx]
        captions += [[(name, "black")]] + [[]] * (len(idx) - 1)
    return plots.image_grid(images, captions, "Fashion-MNIST training images, one row per class",
                            ncols=N_SAMPLES_PER_CLASS)


def _correct_grid(preds, test, pos, model: str):
    picked: dict[str, list[dict[str, str]]] = {c: [] for c in CLASSES}
    for r in preds:
        if r["actual"] == r["predicted"] and len(picked[r["actual"]]) < N_CORRECT_PER_CLASS:
            picked[r["actual"]].append(r)
    chosen = [picked[c][k] for k in range(N_CORRECT_PER_CLASS) for c in CLASSES if len(picked[c]) > k]
    if not chosen:
        return plots.message(f"{model}: no test image was classified correctly")
    return plots.image_grid([_image(test, pos, r["index"]) for r in chosen],
                            [[(r["predicted"], plots.GREEN), (f"{100 * float(r['confidence']):.0f}% sure", plots.GREY)]
                             for r in chosen],
                            f"{model}: correctly classified test images (one column per class)", ncols=len(CLASSES))


def _misclassified_grid(preds, test, pos, model: str):
    wrong = sorted((r for r in preds if r["actual"] != r["predicted"]),
                   key=lambda r: (-float(r["confidence"]), int(r["index"])))[:N_MISCLASSIFIED]
    if not wrong:
        return plots.message(f"{model}: no test image was misclassified")
    return plots.image_grid([_image(test, pos, r["index"]) for r in wrong],
                            [[(f"predicted {r['predicted']}", plots.RED), (f"true {r['actual']}", plots.GREEN)]
                             for r in wrong],
                            f"{model}: the most confident mistakes on the test set", ncols=8)


@torch.no_grad()
def _kernels_figure(row: dict[str, Any], test: Split):
    model, ck = checkpoint.load(_need(row["spec"].paths.model))
    conv = models.first_conv(model)
    image = test.images[:1]
    maps = conv(normalize(to_float(image), ck.stats))[0]
    kernels = conv.weight.sum(dim=1)  # over input channels (one for grayscale input)
    caption = f"test image {int(test.index[0])} ({CLASSES[int(test.labels[0])]})"
    return plots.conv_kernels(kernels.numpy(), maps.numpy(), image[0].numpy(),
                              f"{row['model']}: the {len(kernels)} kernels of the first conv layer and "
                              "what each does to one test image", caption)


# --------------------------------------------------------------------------- markdown

def _markdown(rows, best, figures: dict[str, tuple[str, str]], per_class: dict[str, dict[str, float]]) -> str:
    loss_name = LOSS_NAMES.get(best["loss"], best["loss"])
    out = ["# Fashion-MNIST: model comparison", "",
           f"Best model: **{best['model']}** ({best['arch']}, {loss_name}, {_recipe(best)} recipe), test accuracy "
           f"**{100 * best['test_accuracy']:.2f}%**, trained in {plots.seconds(best['train_time_s'])}.", "",
           "One row per model of `params.yaml`, in its order. Test metrics are on the 10,000 test images (the "
           "test loss is cross-entropy, whatever loss trained the model); training time is the training loop "
           "alone, on this machine.", "",
           "| | model | architecture | parameters | loss | recipe | epochs | test accuracy | test loss "
           "| training time | images/s |",
           "|---|---|---|--:|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        name = f"**{r['model']}**" if r is best else r["model"]
        out.append(f"| {'★ best' if r is best else ''} | {name} | {r['arch']} | {r['n_parameters']:,} | {r['loss']} "
                   f"| {_recipe(r)} | {r['epochs']} | {100 * r['test_accuracy']:.2f}% | {r['test_loss']:.4f} "
                   f"| {plots.seconds(r['train_time_s'])} | {r['images_per_s']:,.0f} |")
    out += ["", *_published_section(rows)]
    if per_class:
        out += [f"## Per class ({best['model']})", "", "| class | precision | recall | F1 |", "|---|--:|--:|--:|"]
        out += [f"| {c} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |" for c, s in per_class.items()]
        out.append("")
    out += ["## Figures", ""]
    for fname, (heading, caption) in figures.items():
        out += [f"### {heading}", "", caption, "", f"![{heading}](figures/{fname})", ""]
    if not any(r["cnn"] for r in rows):
        out += ["No model in `params.yaml` has a convolutional layer, so there is no kernel figure.", ""]
    return "\n".join(out)


def _recipe(row: dict[str, Any]) -> str:
    spec = row["spec"]
    return "project (no published recipe)" if spec.fallback else spec.recipe


def _published_section(rows) -> list[str]:
    out = ["## Against the published figures", "",
           "A published figure is set against this run only when the run used the source's recipe "
           "(`dvc exp run -S recipe=published`); otherwise the table says which recipe produced it. "
           "Times published by the sources were measured on their machines: shown as published, not compared. "
           "`*`: a setting the source did not publish (the project's choice, params.yaml `models.M.published`).", "",
           "| model | source | published recipe | published accuracy | this run | difference | published loss "
           "| this run | published time |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        f, spec = r["published"], r["spec"]
        recipe = published.describe_recipe(spec.published, spec.assumed)
        if f is None:
            source = next((s.name for s in published.SOURCES if r["arch"] in s.models), "")
            out.append(f"| {r['model']} | {source or 'ours'} | {recipe} | not published | | | | | |")
            continue
        time = f"{f.train_time_s:.2f} s" if f.train_time_s else ""  # as published, to the digit
        if _comparable(r):
            diff = f"{100 * (r['test_accuracy'] - f.test_accuracy):+.2f} pp"
            ours, ours_loss = f"{100 * r['test_accuracy']:.2f}%", f"{r['test_loss']:.4f} (test)"
        else:
            diff, ours, ours_loss = f"not compared: this run used the {_recipe(r)} recipe", "", ""
        out.append(f"| {r['model']} | {f.source} | {recipe} | {100 * f.test_accuracy:.2f}% | {ours} | {diff} "
                   f"| {f.loss:.4f} ({f.loss_kind}) | {ours_loss} | {time} |")
    out += ["", "pp: percentage points.", "", "What each source showed, and where it is here:", ""]
    out += [f"- **{s.name}** ({', '.join(s.models)}): {s.showed}. Here: {s.here}." for s in published.SOURCES]
    return out + [""]
