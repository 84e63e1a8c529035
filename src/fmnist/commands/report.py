"""report: reports/report.md and reports/figures/*.png, from every model's train and eval outputs.

Reads, for each model of params.yaml's ``models:`` (the paths of its run spec):
reports/train/M/{metrics.json,history.csv}, reports/eval/M/{metrics.json,calibration.csv}, and
reports/eval/M/{predictions.csv,per_class.json} of the models it draws or compares; the checkpoints
of the models whose first conv layer it draws; the processed training and test images.

The best model is chosen on the validation split (fmnist.selection), never on the test set; the
test figures of every model are reported with their 95% interval, and McNemar's exact test says
whether the best and the runner-up differ on the test images. A model is compared with a published
figure only when both used the same recipe (src/fmnist/published.py). The output depends on those
inputs only: no timestamps, so re-running on the same inputs writes identical files. Registering
the best model in MLflow is the register stage's work (fmnist.commands.register), not this one's.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fmnist import FmnistError, checkpoint, plots, published, selection, stats
from fmnist.core import metrics, models
from fmnist.data import CLASSES
from fmnist.data.loader import Split, load_split, normalize, to_float
from fmnist.files import save_figure, write_text
from fmnist.runspec import RunSpec

log = logging.getLogger(__name__)

REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")
LOSS_NAMES = {"ce": "cross-entropy", "focal": "focal loss"}
EVAL_KEYS = ("test_accuracy", "test_nll", "test_ece", "test_ece_ts", "temperature", *selection.KEYS)
SIGNIFICANCE = 0.05
N_SAMPLES_PER_CLASS = 8
N_CORRECT_PER_CLASS = 2
N_MISCLASSIFIED = 24
KERNELS_OF = ("cnn_bn",)  # besides the best model: the CNN whose source showed its kernels


class ReportError(FmnistError):
    """An input of the report is missing or unreadable. The message names the file."""


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
    for path in (p.train_metrics, p.history, p.eval_metrics, p.predictions, p.per_class, p.calibration):
        _need(path)
    tm, em = _json(p.train_metrics), _json(p.eval_metrics)
    try:
        history = {k: [float(r[k]) for r in _csv(p.history)] for k in ("epoch", "train_loss", "val_loss")}
        row = {"model": spec.model, "arch": spec.arch, "loss": spec.loss, "n_parameters": int(tm["n_parameters"]),
               "epochs": int(tm["epochs"]), "train_time_s": float(tm["train_time_s"]),
               "images_per_s": float(tm["images_per_s"]), **{k: float(em[k]) for k in EVAL_KEYS}}
    except (KeyError, ValueError, TypeError) as e:
        raise ReportError(f"{p.train_metrics.parent} or {p.eval_metrics.parent}: a metrics or history file lacks "
                          f"{e}; run `dvc repro` to rebuild them") from e
    has_conv = models.first_conv(models.build(spec.arch, spec.hparams)) is not None
    row.update(spec=spec, history=history, cnn=has_conv,
               published=published.figure(spec.arch, spec.loss, spec.hparams))
    return row


# --------------------------------------------------------------------------- the stage

def run(specs: dict[str, RunSpec]) -> Path:
    rows = sorted((_model_row(spec) for spec in specs.values()), key=lambda r: selection.rank(r["model"], r))
    best = rows[0]
    best_fc = next((r for r in rows if not r["cnn"]), None)
    best_cnn = next((r for r in rows if r["cnn"]), None)
    processed = best["spec"].paths.processed
    test = load_split("test", processed)
    for r in rows:  # one run per model: the interval is the test set's noise (Wilson)
        r["test_interval"] = stats.accuracy_summary([r["test_accuracy"]], len(test))
    figures: dict[str, tuple[str, str]] = {}  # file name -> (heading, caption)

    def save(fig, fname: str, heading: str, caption: str) -> None:
        save_figure(FIGURES / fname, fig)
        figures[fname] = (heading, caption)

    save(plots.accuracy_and_time([{"model": r["model"], "accuracy": r["test_accuracy"], "best": r is best,
                                   "published": r["published"].test_accuracy if _comparable(r) else None,
                                   "train_time_s": r["train_time_s"]} for r in rows]),
         "accuracy_time.png", "Accuracy and training time",
         "Test accuracy and training time per model, the best (on validation) first; a black mark is the "
         "figure its source published, where this run used the source's recipe.")
    save(plots.loss_curves({r["model"]: r["history"] for r in _in_params_order(rows, specs)},
                           {r["model"]: _loss_name(r["spec"]) for r in rows}),
         "loss_curves.png", "Loss curves",
         "Training loss (the loss each model trained on) and validation loss (always cross-entropy) per epoch.")
    save(_samples(load_split("train", processed)), "data_samples.png", "The data",
         f"The first {N_SAMPLES_PER_CLASS} training images of each class.")
    runner_up = rows[1] if len(rows) > 1 else None
    preds = {r["model"]: _csv(r["spec"].paths.predictions)
             for r in {id(r): r for r in (best, runner_up, best_fc, best_cnn) if r is not None}.values()}
    save(plots.confusion(_confusion(preds[best["model"]]), CLASSES,
                         f"{best['model']}: confusion matrix on the test set "
                         f"(accuracy {100 * best['test_accuracy']:.2f}%)"),
         "confusion_best.png", f"Confusion matrix of the best model ({best['model']})",
         "Rows: the true class; columns: the predicted class. Numbers are image counts.")
    save(plots.reliability({f"{r['model']} (T = {r['temperature']:.2f})": _csv(r["spec"].paths.calibration)
                            for r in _in_params_order(rows, specs)},
                           "Reliability on the test set, before and after temperature scaling", ncols=3),
         "reliability.png", "Calibration",
         "Per confidence bin (15 of equal width), the accuracy of the test images in it: bars for the "
         "probabilities as the model gives them, orange after temperature scaling (one T per model, fitted on the "
         "validation split). Bars under the diagonal: the model is more confident than it is right.")
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
    test_of_two = None if runner_up is None else _mcnemar(preds[best["model"]], preds[runner_up["model"]])
    write_text(REPORT, _markdown(_in_params_order(rows, specs), best, runner_up, test_of_two, figures, per_class,
                                 len(test)))
    log.info("wrote %s and %d figures in %s", REPORT, len(figures), FIGURES)
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


def _mcnemar(a: list[dict[str, str]], b: list[dict[str, str]]) -> stats.McNemar:
    """McNemar's exact test of two models' predictions.csv, image by image (matched on the index)."""
    right_b = {r["index"]: r["actual"] == r["predicted"] for r in b}
    if len(right_b) != len(a) or any(r["index"] not in right_b for r in a):
        raise ReportError("predictions.csv of two models score different test images; run `dvc repro` to "
                          "rebuild them")
    return stats.mcnemar([r["actual"] == r["predicted"] for r in a], [right_b[r["index"]] for r in a])


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

def _markdown(rows, best, runner_up, test_of_two: stats.McNemar | None, figures: dict[str, tuple[str, str]],
              per_class: dict[str, dict[str, float]], n_test: int) -> str:
    loss_name = LOSS_NAMES.get(best["loss"], best["loss"])
    out = ["# Fashion-MNIST: model comparison", "",
           f"Best model: **{best['model']}** ({best['arch']}, {loss_name}, {_recipe(best)} recipe), validation "
           f"accuracy **{100 * best['val_accuracy']:.2f}%**, test accuracy **{_interval(best)}**, trained in "
           f"{plots.seconds(best['train_time_s'])}.", "",
           f"The best model is the one with {selection.RULE}. The test figures below are reported for every "
           "model but decide nothing, so the best model's test accuracy is an unbiased estimate of how it does "
           "on new images. The register stage (`fmnist register`) makes the same model the MLflow `champion`.", "",
           f"One row per model of `params.yaml`, in its order. Validation figures are on the validation split, "
           f"scored as the test set is; test figures on the {n_test:,} test images. Test accuracy: with its 95% "
           "interval (Wilson, from the test images alone; a rerun with another seed varies too). NLL: the mean "
           "negative log-likelihood of the true class (cross-entropy, whatever loss trained the model). ECE: the "
           "expected calibration error (15 equal-width confidence bins), as trained and after temperature "
           "scaling (one T per model, fitted on the validation split). Training time is the training loop "
           "alone, on this machine.", "",
           "| | model | architecture | parameters | loss | recipe | epochs | val accuracy "
           "| test accuracy (95% interval) | test NLL | ECE | ECE after T | training time | images/s |",
           "|---|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        name = f"**{r['model']}**" if r is best else r["model"]
        out.append(f"| {'★ best' if r is best else ''} | {name} | {r['arch']} | {r['n_parameters']:,} | {r['loss']} "
                   f"| {_recipe(r)} | {r['epochs']} | {100 * r['val_accuracy']:.2f}% | {_interval(r)} "
                   f"| {r['test_nll']:.4f} | {100 * r['test_ece']:.2f}% | {100 * r['test_ece_ts']:.2f}% "
                   f"| {plots.seconds(r['train_time_s'])} | {r['images_per_s']:,.0f} |")
    out += ["", _mcnemar_text(best, runner_up, test_of_two), "", *_published_section(rows)]
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


def _interval(row: dict[str, Any]) -> str:
    """94.03% (93.55–94.48): the test accuracy and its 95% interval."""
    s = row["test_interval"]
    return f"{100 * s.mean:.2f}% ({100 * s.lo:.2f}–{100 * s.hi:.2f})"


def _mcnemar_text(best, runner_up, m: stats.McNemar | None) -> str:
    if m is None:
        return "One model only: no runner-up to test the best model against."
    a, b = best["model"], runner_up["model"]
    if m.p_value >= SIGNIFICANCE:
        verdict = "no difference shown"
    else:
        verdict = f"a difference at the {SIGNIFICANCE:.0%} level, in favour of {a if m.only_a > m.only_b else b}"
    return (f"The best model against the runner-up (the second on validation), McNemar's exact test on the "
            f"same {m.n:,} test images: "
            f"only {a} right on {m.only_a:,}, only {b} right on {m.only_b:,} (both right on {m.both:,}, both "
            f"wrong on {m.neither:,}); p = {m.p_value:.3g}: {verdict}.")


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
            ours, ours_loss = f"{100 * r['test_accuracy']:.2f}%", f"{r['test_nll']:.4f} (test)"
        else:
            diff, ours, ours_loss = f"not compared: this run used the {_recipe(r)} recipe", "", ""
        out.append(f"| {r['model']} | {f.source} | {recipe} | {100 * f.test_accuracy:.2f}% | {ours} | {diff} "
                   f"| {f.loss:.4f} ({f.loss_kind}) | {ours_loss} | {time} |")
    out += ["", "pp: percentage points.", "", "What each source showed, and where it is here:", ""]
    out += [f"- **{s.name}** ({', '.join(s.models)}): {s.showed}. Here: {s.here}." for s in published.SOURCES]
    return out + [""]
