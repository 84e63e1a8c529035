"""Matplotlib figures for the report, the MLflow runs and `fmnist compare`.

Every function takes plain numbers and arrays (no torch) and returns a
``matplotlib.figure.Figure`` built without pyplot: no global figure state, no
GUI backend, PNGs rendered by Agg. Save them with ``fmnist.atomic.save_figure``.
matplotlib is imported lazily, inside the functions, so importing this module is free.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Sequence

DPI = 120
BLUE, GREEN, RED, GREY, ORANGE = "#4C72B0", "#2CA02C", "#D62728", "#7F7F7F", "#DD8452"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def accuracy_and_time(rows: Sequence[dict[str, Any]]):
    """Two horizontal bar charts side by side: test accuracy and training time per model.

    ``rows``: dicts with ``model``, ``accuracy`` (0..1), ``published`` (0..1 or None),
    ``train_time_s`` and ``best`` (bool), drawn top to bottom in the given order.
    """
    n = len(rows)
    fig = _figure(12, 1.6 + 0.42 * n)
    ax_acc, ax_time = fig.subplots(1, 2, sharey=True)
    y = list(range(n))[::-1]
    colors = [GREEN if r["best"] else BLUE for r in rows]
    labels = [f"{r['model']} (best)" if r["best"] else r["model"] for r in rows]

    acc = [100 * r["accuracy"] for r in rows]
    ax_acc.barh(y, acc, color=colors, height=0.65)
    for yi, a in zip(y, acc):  # at the bar's start, clear of the published markers near its end
        inside = a > 20
        ax_acc.text(1.5 if inside else a + 1, yi, f"{a:.2f}%", va="center", ha="left",
                    color="white" if inside else "black", fontsize=9.5, fontweight="bold")
    pub = [(yi, 100 * r["published"]) for yi, r in zip(y, rows) if r.get("published") is not None]
    if pub:
        ax_acc.scatter([p for _, p in pub], [yi for yi, _ in pub], marker="|", s=500, linewidths=2.5,
                       color="black", zorder=3, label="published figure (same recipe)")
        fig.legend(loc="outside lower center", fontsize=9.5, frameon=False, markerscale=0.6)
    ax_acc.set_xlim(0, 100)
    ax_acc.set_xlabel("test accuracy (%)")
    ax_acc.set_title("Test accuracy")
    ax_acc.set_yticks(y, labels)

    times = [r["train_time_s"] for r in rows]
    ax_time.barh(y, times, color=colors, height=0.65)
    top = max(times) if times and max(times) > 0 else 1.0
    for yi, t in zip(y, times):
        ax_time.text(t + top * 0.01, yi, seconds(t), va="center", ha="left", fontsize=9)
    ax_time.set_xlim(0, top * 1.18)
    ax_time.set_xlabel("training time (s)")
    ax_time.set_title("Training time")
    for ax in (ax_acc, ax_time):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Accuracy and cost per model (best in green)", fontsize=13)
    return fig


def seconds(t: float) -> str:
    """2.35 s, 42.0 s, 3.5 min: readable at any scale."""
    return f"{t:.2f} s" if t < 10 else f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


def loss_curves(histories: dict[str, dict[str, Sequence[float]]], train_loss: dict[str, str] | str = "loss",
                title: str = "Training and validation loss per epoch"):
    """Train and validation loss per epoch, one small panel per model, shared y axis.

    ``histories``: panel -> {"epoch": [...], "train_loss": [...], "val_loss": [...]}; ``train_loss``:
    the name of the loss each panel trained on (one name for all, or panel -> name). Each curve is
    labelled by what it measures: the training loss is the objective, the validation loss is
    always cross-entropy.
    """
    n = len(histories)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(3.3 * ncols + 0.4, 2.7 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, (model, h) in zip(axes, histories.items()):
        name = train_loss if isinstance(train_loss, str) else train_loss[model]
        ax.plot(h["epoch"], h["train_loss"], marker="o", ms=4, color=BLUE, label=f"train ({name})")
        ax.plot(h["epoch"], h["val_loss"], marker="s", ms=4, color=ORANGE, label="validation (cross-entropy)")
        ax.set_title(model, fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper right", frameon=False)
        epochs = list(h["epoch"])
        if epochs:
            ax.set_xticks(_int_ticks(int(min(epochs)), int(max(epochs))))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    for ax in axes[::ncols]:
        ax.set_ylabel("loss")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    return fig


def _int_ticks(lo: int, hi: int, most: int = 8) -> list[int]:
    step = max(1, math.ceil((hi - lo + 1) / most))
    return list(range(lo, hi + 1, step))


def confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str):
    """Confusion matrix: rows the true class, columns the predicted one. Colour is the
    share of the true class (so rare and common classes read alike); numbers are counts."""
    import numpy as np

    cm = np.asarray(cm, dtype=np.int64)
    totals = cm.sum(axis=1, keepdims=True)
    share = cm / np.maximum(totals, 1)
    k = len(classes)
    fig = _figure(8.6, 7.6)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8.5,
                        color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), classes, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    ax.set_title(title, fontsize=12)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def per_class(scores: dict[str, dict[str, float]], title: str):
    """Precision, recall and F1 per class as grouped horizontal bars, classes top to bottom."""
    classes = list(scores)
    fig = _figure(8, 0.5 * len(classes) + 1.6)
    ax = fig.subplots()
    h = 0.26
    for k, (metric, color) in enumerate((("precision", BLUE), ("recall", ORANGE), ("f1", GREEN))):
        y = [len(classes) - 1 - i + (1 - k) * h for i in range(len(classes))]
        ax.barh(y, [scores[c][metric] for c in classes], height=h, color=color, label=metric.replace("f1", "F1"))
    ax.set_yticks(range(len(classes))[::-1], classes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score on the test set")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(loc="outside lower center", ncols=3, frameon=False)
    ax.set_title(title, fontsize=12)
    return fig


def image_grid(images: Sequence[Any], captions: Sequence[Sequence[tuple[str, str]]], title: str, ncols: int = 6):
    """A grid of 28x28 grayscale images, each with a caption of one or two lines, each line
    ``(text, colour)`` (a misclassified image: the prediction in red above the truth in green)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(1.75 * ncols, 2.05 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, img, lines in zip(axes, images, captions):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for k, (text, colour) in enumerate(reversed(lines)):  # bottom line first, just above the image
            ax.text(0.5, 1.02 + 0.13 * k, text, transform=ax.transAxes, ha="center", va="bottom",
                    fontsize=8.5, color=colour)
    fig.suptitle(title, fontsize=12)
    return fig


def conv_kernels(kernels: Any, maps: Any, image: Any, title: str, image_caption: str, ncols: int = 8):
    """The first conv layer's kernels and the feature map each makes of one image.

    ``kernels``: (C, kh, kw) (summed over input channels); ``maps``: (C, H, W);
    ``image``: (28, 28) uint8. Each cell pairs kernel k (top, blue negative, red
    positive) with its feature map (below, bright = strong response).
    """
    import numpy as np

    kernels, maps = np.asarray(kernels, dtype=np.float64), np.asarray(maps, dtype=np.float64)
    c = len(kernels)
    groups = math.ceil(c / ncols)
    ncols = math.ceil(c / groups)  # rows as even as possible: 10 kernels -> 2 x 5, not 8 + 2
    fig = _figure(1.45 * ncols + 2.6, 2.75 * groups + 0.8)
    outer = fig.add_gridspec(1, 2, width_ratios=[2.3, 1.45 * ncols], wspace=0.04)
    left = outer[0].subgridspec(3, 1, height_ratios=[1, 2, 1])
    ax_img = fig.add_subplot(left[1])
    ax_img.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax_img.set_title(f"input:\n{image_caption}", fontsize=10)
    ax_img.set_axis_off()

    grid = outer[1].subgridspec(2 * groups, ncols, hspace=0.05, wspace=0.08)
    lim = float(np.abs(kernels).max()) or 1.0
    lo, hi = float(maps.min()), float(maps.max())  # one scale for every map, so their strengths compare
    for i in range(c):
        g, col = divmod(i, ncols)
        ax_k = fig.add_subplot(grid[2 * g, col])
        ax_k.imshow(kernels[i], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax_k.set_title(f"kernel {i + 1}", fontsize=8)
        ax_m = fig.add_subplot(grid[2 * g + 1, col])
        shown = ax_m.imshow(maps[i], cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        for ax in (ax_k, ax_m):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(shown, ax=fig.axes[1:], shrink=0.6, pad=0.01, label="feature map value (one scale for all)")
    fig.suptitle(title, fontsize=12)
    fig.supxlabel("each pair: a kernel's weights (blue negative, red positive) above its feature map "
                  "of the input (bright: strong response)", fontsize=10)
    return fig


def interval_panels(panels: dict[str, dict[str, Any]], ylabel: str, fmt: str, title: str, ncols: int = 3):
    """Small multiples, one panel per group (a model): each entry's mean as a dot with its 95% interval
    as an error bar, side by side, each panel on its own y scale so that differences within it show.

    ``panels``: name -> {"points": [{"label", "mean", "lo", "hi" (None: no interval), "color",
    "filled" (False: an open dot, e.g. an interval of another kind)}], "note": a line under the name}.
    ``fmt`` formats the value written beside each dot.
    """
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(3.7 * ncols + 0.4, 3.3 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, p) in zip(axes, panels.items()):
        for i, pt in enumerate(p["points"]):
            has = pt.get("lo") is not None and pt.get("hi") is not None
            yerr = [[pt["mean"] - pt["lo"]], [pt["hi"] - pt["mean"]]] if has else None
            ax.errorbar(i, pt["mean"], yerr=yerr, fmt="o", ms=7, capsize=7, elinewidth=1.8, capthick=1.8,
                        color=pt.get("color", BLUE), mfc=pt.get("color", BLUE) if pt.get("filled", True) else "white",
                        mew=1.8)
            ax.annotate(fmt.format(pt["mean"]), (i, pt["mean"]), xytext=(9, 0), textcoords="offset points",
                        va="center", fontsize=8.5)
        ax.set_xticks(range(len(p["points"])), [pt["label"] for pt in p["points"]], fontsize=8.5)
        ax.set_xlim(-0.5, len(p["points"]) - 0.3)
        ax.margins(y=0.15)
        note = p.get("note")
        ax.set_title(f"{name}\n{note}" if note else name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    return fig


def reliability(panels: dict[str, Sequence[dict[str, Any]] | None], title: str, ncols: int = 2):
    """Reliability diagrams, one panel per entry: accuracy against confidence, bin by bin.

    ``panels``: title -> the bins, rows as calibration.csv holds them (``bin_lo``, ``bin_hi``,
    ``count``, ``confidence``, ``accuracy``; optionally the same after temperature scaling,
    ``count_ts``, ``confidence_ts``, ``accuracy_ts``), numbers, or None or "" for an empty bin;
    None instead of the rows: a panel that says "no run". Blue bars: each bin's accuracy, with the
    bin's share of the images written at its foot; hatched red: the gap to the bin's mean
    confidence (above the bar: overconfident; inside it: underconfident); orange: the bins after
    temperature scaling. The ECE in the legend is computed from the bins given.
    """
    from matplotlib.patches import Patch

    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig_width = max(3.6 * ncols + 0.3, 6.0)
    fig = _figure(fig_width, 3.7 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, rows) in zip(axes, panels.items()):
        ax.set_title(name, fontsize=10)
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color=GREY)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="confidence (top class)", ylabel="accuracy")
        ax.grid(alpha=0.25)
        ax.set_axisbelow(True)
        if rows is None:
            ax.text(0.5, 0.5, "no run", ha="center", va="center", fontsize=12, color=GREY)
            continue
        before, after = _bins(rows, ""), _bins(rows, "_ts")
        total = sum(b[2] for b in before) or 1
        lo, width = [b[0] for b in before], [b[1] - b[0] for b in before]
        conf, acc = [b[3] for b in before], [b[4] for b in before]
        ax.bar(lo, acc, width=width, align="edge", color=BLUE, edgecolor="white", linewidth=0.6)
        ax.bar(lo, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, align="edge", fill=False,
               hatch="////", edgecolor=RED, linewidth=0.8)
        for x0, x1, c, _, a in before:
            if c / total >= 0.005:
                ax.text((x0 + x1) / 2, 0.012, f"{c / total:.0%}" if c / total >= 0.01 else "<1%", rotation=90,
                        ha="center", va="bottom", fontsize=6.5, color="white" if a > 0.12 else "black")
        handles = [Patch(color=BLUE, label=f"accuracy (ECE {_ece(before):.2%})"),
                   Patch(fill=False, hatch="////", edgecolor=RED, label="gap to mean confidence")]
        if after:
            handles += ax.plot([b[3] for b in after], [b[4] for b in after], marker="o", ms=3, lw=1.3,
                               color=ORANGE, label=f"temperature-scaled (ECE {_ece(after):.2%})")
        ax.legend(handles=handles, fontsize=7, loc="upper left", frameon=False)
    for ax in axes[n:]:
        ax.set_visible(False)
    note = "at each bar's foot: its share of the images; dashed: perfect calibration"
    fig.suptitle(textwrap.fill(title, int(11 * fig_width)) + f"\n({note})", fontsize=11)
    return fig


def _bins(rows: Sequence[dict[str, Any]], suffix: str) -> list[tuple[float, float, int, float, float]]:
    """The non-empty bins of ``rows`` as (lo, hi, count, confidence, accuracy), from numbers or CSV text."""
    out = []
    for r in rows:
        count, conf, acc = (r.get(f"{k}{suffix}") for k in ("count", "confidence", "accuracy"))
        if count in (None, "") or conf in (None, "") or acc in (None, "") or int(float(count)) == 0:
            continue
        out.append((float(r["bin_lo"]), float(r["bin_hi"]), int(float(count)), float(conf), float(acc)))
    return out


def _ece(bins: list[tuple[float, float, int, float, float]]) -> float:
    total = sum(b[2] for b in bins)
    return sum(c * abs(conf - acc) for _, _, c, conf, acc in bins) / total if total else 0.0


def message(text: str):
    """A small figure that says why there is nothing to draw."""
    fig = _figure(6, 1.6)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    return fig
