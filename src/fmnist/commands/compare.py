"""`fmnist compare`: the architecture x loss table of the MLflow runs, as markdown and a PNG heatmap.

For each (model, loss) pair it takes the latest FINISHED run that has test
metrics (``dvc exp run -S loss=focal`` adds the focal column). Runs are tagged
``model`` and ``loss`` by the train stage; evaluate adds ``test_accuracy`` and
``test_loss``. The files go to OUT/compare.md and OUT/compare.png (default OUT:
reports/, beside, not inside, the report stage's reports/figures/, which DVC owns). Where a
model has both a cross-entropy and a focal run, OUT/compare_curves.png puts their training and
validation loss curves (from the runs' MLflow histories) side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmnist import FmnistError

# metric -> (title, markdown format, heatmap format, higher is better)
METRICS = {
    "test_accuracy": ("Test accuracy", "{:.2%}", "{:.2%}", True),
    "test_loss": ("Test loss (cross-entropy)", "{:.4f}", "{:.3f}", False),
    "train_time_s": ("Training time (s)", "{:.1f}", "{:.1f}", False),
}
LOSS_ORDER = ("ce", "focal")
LOSS_NAMES = {"ce": "cross-entropy", "focal": "focal loss"}


class CompareError(FmnistError):
    """Nothing to compare, or a malformed filter."""


def parse_tags(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompareError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag dvc_exp_name=my-exp")
        tags[key] = value
    return tags


def latest_per_pair(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, loss) -> the newest run with test metrics, whatever order ``runs`` come in."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(runs, key=lambda r: -(r["start_time"] or 0)):
        model, loss = r["tags"].get("model"), r["tags"].get("loss")
        if model and loss and "test_accuracy" in r["metrics"] and (model, loss) not in cells:
            cells[(model, loss)] = r
    return cells


def _model_order(models: set[str], params: str | Path) -> list[str]:
    """params.yaml's order first (where it can be read), then the rest alphabetically."""
    order: list[str] = []
    try:
        from fmnist import config

        order = [m for m in config.load(params).models if m in models]
    except FmnistError:
        pass
    return order + sorted(models - set(order))


def table(cells: dict[tuple[str, str], dict[str, Any]], params: str | Path = "params.yaml"):
    models = _model_order({m for m, _ in cells}, params)
    found = {loss for _, loss in cells}
    losses = [loss for loss in LOSS_ORDER if loss in found] + sorted(found - set(LOSS_ORDER))
    values = {metric: [[cells[(m, loss)]["metrics"].get(metric) if (m, loss) in cells else None for loss in losses]
                       for m in models] for metric in METRICS}
    return models, losses, values


def markdown(models, losses, values, cells, experiment: str, tags: dict[str, str]) -> str:
    where = f"experiment `{experiment}`" + (", tags " + ", ".join(f"`{k}={v}`" for k, v in tags.items())
                                             if tags else "")
    out = ["# Architecture x loss", "",
           f"The latest FINISHED run of each (model, loss) pair with test metrics; {where}. "
           "The test loss is cross-entropy for every run, whatever loss trained it; - means no such run.", ""]
    for metric, (title, fmt, _, higher) in METRICS.items():
        out += [f"## {title}", "", "| model | " + " | ".join(losses) + " |",
                "|---|" + "--:|" * len(losses)]
        for m, row in zip(models, values[metric]):
            best = _best(row, higher)
            cells_md = ["-" if v is None else (f"**{fmt.format(v)}**" if i == best else fmt.format(v))
                        for i, v in enumerate(row)]
            out.append(f"| {m} | " + " | ".join(cells_md) + " |")
        out.append("")
    out += ["Bold: the better loss for that model.", "", "## Runs", "", "| model | loss | run id |", "|---|---|---|"]
    out += [f"| {m} | {loss} | `{cells[(m, loss)]['run_id']}` |" for m in models for loss in losses
            if (m, loss) in cells]
    return "\n".join(out) + "\n"


def _best(row: list[float | None], higher: bool) -> int | None:
    vals = [(v, i) for i, v in enumerate(row) if v is not None]
    if len(vals) < 2:
        return None
    return (max(vals) if higher else min(vals))[1]


def loss_histories(cells: dict[tuple[str, str], dict[str, Any]], models: list[str]) -> dict[str, dict]:
    """"MODEL, LOSS" -> its run's per-epoch train and validation loss, for every model run with both losses."""
    from fmnist import tracking

    out = {}
    for m in models:
        if (m, "ce") in cells and (m, "focal") in cells:
            for loss in ("ce", "focal"):
                h = tracking.metric_histories(cells[(m, loss)]["run_id"], ("train_loss", "val_loss"))
                steps = sorted(set(h["train_loss"]) & set(h["val_loss"]))
                out[f"{m}, {LOSS_NAMES[loss]}"] = {"epoch": steps, "train_loss": [h["train_loss"][e] for e in steps],
                                                  "val_loss": [h["val_loss"][e] for e in steps]}
    return out


def main(experiment: str | None = None, tags: list[str] | tuple[str, ...] = (), out: str | Path = "reports",
         params: str | Path = "params.yaml") -> tuple[Path, Path]:
    from fmnist import plots, tracking
    from fmnist.files import save_figure, write_text

    tag_filter = parse_tags(tags)
    name = experiment or tracking.experiment_name()
    cells = latest_per_pair(tracking.finished_runs(name, tag_filter))
    if not cells:
        raise CompareError(f"no FINISHED run with test metrics in experiment {name!r} at {tracking.tracking_uri()}"
                           + (f" with tags {tag_filter}" if tag_filter else "")
                           + "; run `dvc repro` (or `fmnist train MODEL` and `fmnist evaluate MODEL`) first")
    models, losses, values = table(cells, params)
    text = markdown(models, losses, values, cells, name, tag_filter)
    out = Path(out)
    md, png = out / "compare.md", out / "compare.png"
    write_text(md, text)
    panels = {title: {"values": values[metric], "fmt": hfmt, "higher_is_better": higher}
              for metric, (title, _, hfmt, higher) in METRICS.items()}
    save_figure(png, plots.compare_heatmap(models, losses, panels))
    wrote = [md, png]
    curves = loss_histories(cells, models)
    if curves:
        wrote.append(out / "compare_curves.png")
        save_figure(wrote[-1], plots.loss_curves(curves, {k: k.split(", ")[1] for k in curves},
                                                  "Cross-entropy and focal loss, side by side: loss per epoch"))
    print(text)
    print("wrote " + ", ".join(map(str, wrote)))
    return md, png
