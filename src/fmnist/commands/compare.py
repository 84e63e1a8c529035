"""`fmnist compare`: cross-entropy against focal loss, model by model, over seeds, with 95% intervals.

The train stage tags each MLflow run ``model``, ``loss``, ``recipe``, ``fmnist.cell`` (everything
that decides the run except the seed) and ``fmnist.pair`` (the same without the loss settings), and
logs the param ``seed``; evaluate adds the test metrics and ``calibration.json``. A cell's runs are
the latest FINISHED run with test metrics of each seed (``dvc exp run -S seed=7`` adds one).

- Per cell: n runs; test accuracy, test NLL and ECE with their 95% intervals (a t interval over the
  seeds when n >= 2; for one run, the test set's noise alone: Wilson on the 10,000 test images for
  the accuracy, +- 1.96 standard errors for the NLL, none for the ECE); NLL and ECE after
  temperature scaling.
- Per model: focal minus cross-entropy, paired by seed (same ``fmnist.pair``), over the seeds both
  cells have, with its t interval; "no difference shown" where the interval holds 0.
- Per model with a published figure, the runs of its published recipe (``-S recipe=published``): the
  published accuracy against their interval, and against where one more run would fall (the t
  prediction interval), since the published figure is itself one run.
- ``--versus A B``: model A minus model B, paired by seed, for each loss and recipe both have.
- ``--mcnemar A B``: McNemar's exact test on two models' predictions.csv (no MLflow needed).

Files (default OUT: reports/, beside, not inside, the report stage's reports/figures/, which DVC
owns): OUT/compare.md; OUT/compare.png (each model's test accuracy with its interval, its cells side
by side); OUT/compare_reliability.png (reliability diagrams, cells side by side, model by model,
from the runs' calibration.json, pooled over seeds); and, where a model has both a cross-entropy
and a focal run, OUT/compare_curves.png (their training and validation loss curves).
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist import FmnistError, stats

TEST_IMAGES = 10_000  # the Fashion-MNIST test split, which evaluate scores whole
LOSS_ORDER = ("ce", "focal")
LOSS_NAMES = {"ce": "cross-entropy", "focal": "focal loss"}
NO_DIFFERENCE = "no difference shown"
SECOND_SEED = "a second seed is needed for an interval"
ONE_RUN = "†"  # marks an interval over the test images of one run, not over seeds
# metric -> (column title, scale, decimals, unit)
SHOWN = {"test_accuracy": ("test accuracy", 100, 2, "%"), "test_nll": ("test NLL", 1, 4, ""),
         "test_ece": ("ECE", 100, 2, "%"), "test_nll_ts": ("NLL after TS", 1, 4, ""),
         "test_ece_ts": ("ECE after TS", 100, 2, "%"), "temperature": ("T", 1, 2, "")}
PAIRED = {"test_accuracy": ("pts", 100, 2), "test_nll": ("", 1, 4), "test_ece": ("pts", 100, 2),
          "test_nll_ts": ("", 1, 4), "test_ece_ts": ("pts", 100, 2)}  # TS: after temperature scaling


class CompareError(FmnistError):
    """Nothing to compare, or a malformed filter or predictions file."""


def parse_tags(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompareError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag dvc_exp_name=my-exp")
        tags[key] = value
    return tags


# --------------------------------------------------------------------------- cells and pairs

@dataclass
class Cell:
    """One training setting: its runs, one per seed (the latest FINISHED run with test metrics)."""

    key: str  # the fmnist.cell tag
    pair: str  # the fmnist.pair tag: the setting without the loss's
    model: str
    loss: str
    recipe: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # seed -> run
    label: str = ""  # how tables and figures name it: model and loss, more where that is ambiguous

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, metric: str) -> list[float]:
        return [self.runs[s]["metrics"][metric] for s in self.seeds() if metric in self.runs[s]["metrics"]]

    def seeds(self) -> list[str]:
        return sorted(self.runs, key=_seed_order)


def _seed_order(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def group(runs: list[dict[str, Any]]) -> tuple[list[Cell], int]:
    """The cells of these runs (any order), and how many runs with test metrics carry no
    ``fmnist.cell`` tag (trained before it existed) and are left out."""
    cells: dict[str, Cell] = {}
    untagged = 0
    for r in sorted(runs, key=lambda r: -(r["start_time"] or 0)):
        tags = r["tags"]
        if "test_accuracy" not in r["metrics"]:
            continue
        if "fmnist.cell" not in tags:
            untagged += 1
            continue
        key = tags["fmnist.cell"]
        cell = cells.setdefault(key, Cell(key, tags.get("fmnist.pair", key), tags.get("model", "?"),
                                          tags.get("loss", "?"), tags.get("recipe", "?")))
        cell.runs.setdefault(r["params"].get("seed", r["run_id"]), r)  # newest first: the latest wins
    return list(cells.values()), untagged


def order(cells: list[Cell], params: str | Path) -> list[Cell]:
    """params.yaml's model order (then the others alphabetically), cross-entropy before focal; labels set."""
    models = _model_order({c.model for c in cells}, params)
    losses = {loss: i for i, loss in enumerate(LOSS_ORDER)}
    out = sorted(cells, key=lambda c: (models.index(c.model), losses.get(c.loss, len(losses)), c.loss, c.recipe,
                                       c.key))
    for c in out:
        same = [o for o in out if (o.model, o.loss) == (c.model, c.loss)]
        c.label = f"{c.model}, {LOSS_NAMES.get(c.loss, c.loss)}"
        if len(same) > 1:
            c.label += f" ({c.key.split('/', 2)[-1]})"  # the recipe and the settings' hash
    return out


def _model_order(models: set[str], params: str | Path) -> list[str]:
    """params.yaml's order first (where it can be read), then the rest alphabetically."""
    known: list[str] = []
    try:
        from fmnist import config

        known = [m for m in config.load(params).models if m in models]
    except FmnistError:
        pass
    return known + sorted(models - set(known))


def summaries(cell: Cell) -> dict[str, stats.Summary | None]:
    """Metric -> its summary over the cell's runs (None where no run has it). Over seeds, the
    interval of the accuracy and of the NLL is never narrower than the test set's own noise (Wilson
    on the test images; +- 1.96 standard errors), which every seed's run shares: two seeds that
    happen to agree do not make a setting's accuracy exact."""
    accuracy = cell.values("test_accuracy")
    out: dict[str, stats.Summary | None] = {"test_accuracy": stats.accuracy_summary(accuracy, TEST_IMAGES)}
    if len(accuracy) >= 2:
        out["test_accuracy"] = _at_least(out["test_accuracy"], stats.accuracy_summary(
            [out["test_accuracy"].mean], TEST_IMAGES))
    nll, se = cell.values("test_nll"), cell.values("test_nll_se")
    out["test_nll"] = (stats.from_se(nll[0], se[0]) if len(nll) == 1 and len(se) == 1
                       else stats.summary(nll) if nll else None)
    if len(nll) >= 2 and len(se) == len(nll):
        out["test_nll"] = _at_least(out["test_nll"], stats.from_se(sum(nll) / len(nll), sum(se) / len(se)))
    for metric in ("test_ece", "test_nll_ts", "test_ece_ts", "temperature"):
        values = cell.values(metric)
        out[metric] = stats.summary(values) if values else None
    return out


def _at_least(over_seeds: stats.Summary, test_set: stats.Summary) -> stats.Summary:
    """The interval over seeds, widened where the test set's interval reaches further."""
    return dataclasses.replace(over_seeds, lo=min(over_seeds.lo, test_set.lo), hi=max(over_seeds.hi, test_set.hi))


@dataclass
class Difference:
    """Focal minus cross-entropy for one model and setting, over the seeds both cells have."""

    ce: Cell
    focal: Cell
    seeds: list[str]
    deltas: dict[str, stats.Summary | None]  # metric -> the summary of the per-seed differences


def differences(cells: list[Cell]) -> list[Difference]:
    out = []
    for ce in (c for c in cells if c.loss == "ce"):
        for focal in (c for c in cells if c.loss == "focal" and c.pair == ce.pair):
            seeds, deltas = paired_by_seed(focal, ce)
            out.append(Difference(ce, focal, seeds, deltas))
    return out


def paired_by_seed(a: Cell, b: Cell) -> tuple[list[str], dict[str, stats.Summary | None]]:
    """The seeds both cells have, and per metric of PAIRED the summary of a's run minus b's, seed by seed."""
    seeds = sorted(a.runs.keys() & b.runs.keys(), key=_seed_order)
    deltas = {}
    for metric in PAIRED:
        d = [a.runs[s]["metrics"][metric] - b.runs[s]["metrics"][metric] for s in seeds
             if metric in a.runs[s]["metrics"] and metric in b.runs[s]["metrics"]]
        deltas[metric] = stats.summary(d) if d else None
    return seeds, deltas


def versus(cells: list[Cell], a: str, b: str) -> list[tuple[Cell, Cell, list[str], dict[str, stats.Summary | None]]]:
    """Model ``a`` minus model ``b``, paired by seed, for every loss and recipe both were trained with:
    (a's cell, b's cell, the seeds both have, metric -> the summary of the per-seed differences)."""
    out = []
    for ca in (c for c in cells if c.model == a):
        for cb in (c for c in cells if c.model == b and (c.loss, c.recipe) == (ca.loss, ca.recipe)):
            out.append((ca, cb, *paired_by_seed(ca, cb)))
    return out


def versus_markdown(cells: list[Cell], a: str, b: str) -> list[str]:
    pairs = versus(cells, a, b)
    out = ["", f"## {a} minus {b}, paired by seed", ""]
    if not pairs:
        return out + [f"No loss and recipe with runs of both {a} and {b}."]
    out += ["| loss | recipe | seeds | " + " | ".join(f"Δ {SHOWN[m][0]} (95% CI)" for m in PAIRED) + " |",
            "|---|---|---|" + "--:|" * len(PAIRED)]
    for ca, _, seeds, deltas in pairs:
        out.append(f"| {LOSS_NAMES.get(ca.loss, ca.loss)} | {ca.recipe} | {paired_row(seeds, deltas)} |")
    return out + ["", f"Each seed's {a} run minus its {b} run (same loss and recipe, same test images), with the "
                      f"95% t interval of the mean difference; above 0: {a} gives the higher figure."]


def published_cells(cells: list[Cell]) -> list[tuple[Cell, Any]]:
    """The cells trained on a source's published recipe, with the figure that source published for the
    same architecture, hyperparameters and loss."""
    from fmnist import published

    out = []
    for c in (c for c in cells if c.recipe == "published"):
        params = c.runs[c.seeds()[0]]["params"]
        hparams = {k.removeprefix("hparams."): v for k, v in params.items() if k.startswith("hparams.")}
        f = published.FIGURES.get((params.get("arch", c.model), c.loss))
        if f is not None and {k: str(v) for k, v in f.hparams.items()} == hparams:
            out.append((c, f))
    return out


def published_verdict(figure: float, values: list[float]) -> str:
    """Where a published accuracy stands against this project's runs of the same recipe."""
    if len(values) < 2:
        return SECOND_SEED
    lo, hi = stats.prediction(values)
    where = "inside" if lo <= figure <= hi else "above" if figure > hi else "below"
    return f"[{100 * max(0.0, lo):.2f}, {100 * min(1.0, hi):.2f}]: {where}"


# --------------------------------------------------------------------------- markdown

def shown(s: stats.Summary | None, metric: str) -> str:
    """'91.23% [90.91, 91.55]' (over seeds), '91.23% [90.66, 91.77]†' (one run), '1.23% (one run)'."""
    if s is None:
        return "-"
    _, k, d, unit = SHOWN[metric]
    mean = f"{k * s.mean:.{d}f}{unit}"
    if s.kind == "none":
        return f"{mean} (one run)"
    lo, hi = clipped(s, metric)
    return f"{mean} [{k * lo:.{d}f}, {k * hi:.{d}f}]" + (ONE_RUN if s.n == 1 else "")


def clipped(s: stats.Summary, metric: str) -> tuple[float, float]:
    """The interval within the figure's range: none is below 0, and a share (accuracy, ECE) is at most
    1, where a t interval over few seeds can reach beyond."""
    return max(0.0, s.lo), (min(1.0, s.hi) if SHOWN[metric][3] == "%" else s.hi)


def paired_row(seeds: list[str], deltas: dict[str, stats.Summary | None]) -> str:
    """A paired table's cells: the seeds both sides have, then each metric's difference."""
    shown_seeds = (", ".join(seeds) if len(seeds) > 1 else f"{seeds[0]} only: {SECOND_SEED}" if seeds
                   else "none in common")
    return " | ".join([shown_seeds, *(paired(deltas[m], m) if seeds else "-" for m in PAIRED)])


def paired(s: stats.Summary | None, metric: str) -> str:
    """'+0.12 pts [-0.30, +0.54]: no difference shown', or why there is no interval."""
    if s is None:
        return "-"
    unit, k, d = PAIRED[metric]
    unit = f" {unit}" if unit else ""
    mean = f"{k * s.mean:+.{d}f}{unit}"
    if s.n < 2:
        return f"{mean} (no interval)"
    text = f"{mean} [{k * s.lo:+.{d}f}, {k * s.hi:+.{d}f}]"
    return f"{text}: {NO_DIFFERENCE}" if s.contains(0) else text


def markdown(cells: list[Cell], diffs: list[Difference], experiment: str, tags: dict[str, str],
             untagged: int) -> str:
    where = f"experiment `{experiment}`" + (", tags " + ", ".join(f"`{k}={v}`" for k, v in tags.items())
                                             if tags else "")
    out = ["# Cross-entropy against focal loss, over seeds", "",
           f"Runs of {where}. A cell is one training setting (the `fmnist.cell` tag: model, loss, recipe and "
           "every other setting but the seed); its runs are the latest FINISHED run with test metrics of each "
           "seed. NLL and ECE score the probabilities, whatever loss trained the model."]
    if untagged:
        out.append(f"{untagged} older run(s) without the `fmnist.cell` tag are left out.")
    s = {c.key: summaries(c) for c in cells}
    out += ["", "## Test accuracy and NLL", "", "| cell | n | test accuracy (95% CI) | sd (pts) | test NLL (95% CI) |",
            "|---|--:|--:|--:|--:|"]
    for c in cells:
        acc = s[c.key]["test_accuracy"]
        sd = f"{100 * acc.sd:.2f}" if acc.n >= 2 else "-"
        out.append(f"| {c.label} | {c.n} | {shown(acc, 'test_accuracy')} | {sd} | "
                   f"{shown(s[c.key]['test_nll'], 'test_nll')} |")
    calib = ("test_ece", "test_nll_ts", "test_ece_ts", "temperature")
    out += ["", "## Calibration", "", "| cell | n | " + " | ".join(f"{SHOWN[m][0]} (95% CI)" for m in calib) + " |",
            "|---|--:|" + "--:|" * len(calib)]
    out += [f"| {c.label} | {c.n} | " + " | ".join(shown(s[c.key][m], m) for m in calib) + " |" for c in cells]
    out += ["", f"95% intervals. n >= 2: the t interval over the seeds, what another seed may give (for accuracy and "
            f"NLL, never narrower than the test set's own noise, which all seeds share). {ONE_RUN}: one "
            f"run, whose interval holds the test set's noise alone (accuracy: Wilson on the {TEST_IMAGES:,} test "
            "images; NLL: +- 1.96 standard errors over them): narrower than the seeds' spread, so a second seed is "
            "needed before two settings can be told apart; an end that would fall below 0 (or above 100%) is shown there. "
            "ECE: top-label, 15 equal-width bins. TS: temperature "
            "scaling, one T fitted on the validation split's NLL; it changes no prediction."]

    out += ["", "## Focal loss minus cross-entropy, paired by seed", ""]
    if diffs:
        out += ["| model | seeds | " + " | ".join(f"Δ {SHOWN[m][0]} (95% CI)" for m in PAIRED) + " |",
                "|---|---|" + "--:|" * len(PAIRED)]
        for d in diffs:
            name = d.ce.model if d.focal.label == f"{d.ce.model}, focal loss" else f"{d.focal.label} against ce"
            out.append(f"| {name} | {paired_row(d.seeds, d.deltas)} |")
        out += ["", "Each seed's focal run minus its cross-entropy run (same model and settings), averaged over the "
                f"seeds both have, with the 95% t interval of that mean; \"{NO_DIFFERENCE}\": the interval holds 0. "
                "Above 0: focal loss gives the higher figure (better for accuracy, worse for NLL and ECE). "
                "pts: percentage points."]
    else:
        out.append("No model has both a cross-entropy and a focal-loss cell with the same settings: "
                   "`dvc exp run -S loss=focal` (and `-S seed=N` for more seeds) adds them.")
    with_figures = published_cells(cells)
    if with_figures:
        out += ["", "## Published figures against the same recipe here", "",
                "| model | source | published accuracy | here: n, mean (95% CI) | seeds' range | "
                "one more run here (95%): the published figure is | published loss | test NLL here (95% CI) |",
                "|---|---|--:|--:|--:|--:|--:|--:|"]
        for c, f in with_figures:
            acc, values = s[c.key]["test_accuracy"], c.values("test_accuracy")
            spread = f"{100 * min(values):.2f} to {100 * max(values):.2f}%" if len(values) > 1 else "-"
            out.append(f"| {c.model} | {f.source} | {100 * f.test_accuracy:.2f}% | {c.n}, "
                       f"{shown(acc, 'test_accuracy')} | {spread} | {published_verdict(f.test_accuracy, values)} | "
                       f"{f.loss:.4f} ({f.loss_kind}) | {shown(s[c.key]['test_nll'], 'test_nll')} |")
        out += ["", "A published figure is one run of its source, with a seed of its own: it is set against the "
                "t prediction interval of one more run here (mean +- t * sd * sqrt(1 + 1/n)), not against the "
                "narrower interval of the mean. \"inside\": this recipe, trained here, gives that figure as one of its "
                "runs. A published loss of the test set is a mean cross-entropy, the figure this project calls NLL."]
    out += ["", "## Runs", "", "| cell | tag `fmnist.cell` | seed | run id |", "|---|---|--:|---|"]
    out += [f"| {c.label} | `{c.key}` | {seed} | `{c.runs[seed]['run_id']}` |" for c in cells for seed in c.seeds()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- figures

def accuracy_panels(cells: list[Cell], diffs: list[Difference]) -> dict[str, dict[str, Any]]:
    """compare.png's panels: per model, each cell's mean test accuracy (%) and its interval."""
    from fmnist import plots

    colours = {"ce": plots.BLUE, "focal": plots.ORANGE}
    panels: dict[str, dict[str, Any]] = {}
    for c in cells:
        acc = summaries(c)["test_accuracy"]
        lo, hi = clipped(acc, "test_accuracy")
        name = LOSS_NAMES.get(c.loss, c.loss) + (f"\n{c.recipe} recipe" if "(" in c.label else "")  # short: panels are narrow
        panels.setdefault(c.model, {"points": [], "note": ""})["points"].append(
            {"label": f"{name}\nn = {c.n}", "mean": 100 * acc.mean, "lo": 100 * lo, "hi": 100 * hi,
             "color": colours.get(c.loss, plots.GREY), "filled": acc.n >= 2})
    for d in diffs:
        delta = d.deltas["test_accuracy"]
        if delta is None:
            continue
        if delta.n >= 2:  # the verdict on a line of its own: the panels are narrow
            note = "focal − ce: " + paired(delta, "test_accuracy").replace(f": {NO_DIFFERENCE}", f"\n{NO_DIFFERENCE}")
        else:
            note = "one seed each: a second\nis needed for an interval"
        panels[d.ce.model]["note"] = "\n".join(filter(None, (panels[d.ce.model]["note"], note)))
    return panels


def pooled_bins(cell: Cell) -> tuple[list[dict[str, Any]] | None, int]:
    """The reliability bins of the cell's runs (their calibration.json), pooled: counts added,
    confidence and accuracy averaged with the counts as weights (None if no run logged them);
    and how many runs they pool."""
    from fmnist import tracking

    logged = [tracking.json_artifact(cell.runs[s]["run_id"], "calibration.json") for s in cell.seeds()]
    logged = [c["bins"] for c in logged if c]
    if not logged:
        return None, 0
    rows = []
    for bins in zip(*logged):
        row: dict[str, Any] = {"bin_lo": bins[0]["bin_lo"], "bin_hi": bins[0]["bin_hi"]}
        for suffix in ("", "_ts"):
            count = sum(b[f"count{suffix}"] or 0 for b in bins)
            row[f"count{suffix}"] = count
            for k in ("confidence", "accuracy"):
                row[f"{k}{suffix}"] = (sum((b[f"count{suffix}"] or 0) * (b[f"{k}{suffix}"] or 0) for b in bins) / count
                                       if count else None)
        rows.append(row)
    return rows, len(logged)


def reliability_panels(cells: list[Cell]) -> tuple[dict[str, Any], int]:
    """compare_reliability.png's panels and columns: per model and setting (``fmnist.pair``), its
    cross-entropy cell, then its focal ones; a missing one is a "no run" panel, so that they line up
    (two models a row where each has two panels, so that nine models fit a screen)."""
    rows: dict[str, list[Cell | str]] = {}
    for c in cells:
        rows.setdefault(c.pair, []).append(c)
    for row in rows.values():
        model, losses = row[0].model, [c.loss for c in row]
        row[:0] = [] if "ce" in losses else [f"{model}, {LOSS_NAMES['ce']}"]
        row += [] if "focal" in losses else [f"{model}, {LOSS_NAMES['focal']}"]
    width = max(len(r) for r in rows.values())
    panels: dict[str, Any] = {}
    for row in rows.values():
        for c in row:
            if isinstance(c, str):
                panels[c] = None
                continue
            bins, k = pooled_bins(c)
            runs = "1 run" if c.n == 1 else f"{k} runs pooled" if k == c.n else f"{k} of {c.n} runs pooled"
            panels[f"{c.label} ({runs})"] = bins
        for j in range(len(row), width):  # another setting has more focal cells than this one
            panels[f"{row[0] if isinstance(row[0], str) else row[0].label} [{j + 1}]"] = None
    return panels, 2 * width if width == 2 and len(rows) > 2 else width


def loss_histories(diffs: list[Difference]) -> tuple[dict[str, dict], dict[str, str]]:
    """For every model with a cross-entropy and a focal cell: panel -> the per-epoch train and validation
    loss of the run of the first seed both have, and panel -> the loss it trained on."""
    from fmnist import tracking

    curves, losses = {}, {}
    for d in diffs:
        if not d.seeds:
            continue
        for c in (d.ce, d.focal):
            h = tracking.metric_histories(c.runs[d.seeds[0]]["run_id"], ("train_loss", "val_loss"))
            steps = sorted(set(h["train_loss"]) & set(h["val_loss"]))
            panel = f"{c.label}, seed {d.seeds[0]}"
            curves[panel] = {"epoch": steps, "train_loss": [h["train_loss"][e] for e in steps],
                             "val_loss": [h["val_loss"][e] for e in steps]}
            losses[panel] = LOSS_NAMES.get(c.loss, c.loss)
    return curves, losses


# --------------------------------------------------------------------------- McNemar

def predictions_file(name: str) -> Path:
    """A model's reports/eval/MODEL/predictions.csv, or the path itself."""
    from fmnist.runspec import RunPaths

    path = Path(name)
    if path.is_file():
        return path
    of_model = RunPaths.of(name).predictions
    if of_model.is_file():
        return of_model
    raise CompareError(f"--mcnemar {name}: no such file, nor {of_model}; give a model evaluated here "
                       "(`dvc repro evaluate@MODEL`) or the path to a predictions.csv")


def read_correct(path: Path) -> dict[int, bool]:
    """Test image index -> whether the prediction is right, from an evaluate predictions.csv."""
    try:
        with open(path, newline="") as f:
            return {int(r["index"]): r["actual"] == r["predicted"] for r in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError) as e:
        raise CompareError(f"{path}: not a predictions.csv of `fmnist evaluate` (columns index, actual, "
                           f"predicted; {type(e).__name__}: {e})") from e


def mcnemar(a: str, b: str) -> stats.McNemar:
    """McNemar's exact test of two models' predictions on the same test images; printed, and returned."""
    pa, pb = predictions_file(a), predictions_file(b)
    ca, cb = read_correct(pa), read_correct(pb)
    if ca.keys() != cb.keys():
        raise CompareError(f"--mcnemar: {pa} and {pb} score different images ({len(ca)} and {len(cb)}, "
                           f"{len(ca.keys() ^ cb.keys())} not in both); evaluate both on the same test split")
    images = sorted(ca)
    t = stats.mcnemar([ca[i] for i in images], [cb[i] for i in images])
    verdict = (f"A and B differ at the 5% level ({'A' if t.only_a > t.only_b else 'B'} is right more often)"
               if t.p_value < 0.05 else f"{NO_DIFFERENCE} at the 5% level")
    print(f"McNemar's exact test on {t.n:,} test images\n"
          f"  A: {pa} (accuracy {(t.both + t.only_a) / t.n:.2%})\n"
          f"  B: {pb} (accuracy {(t.both + t.only_b) / t.n:.2%})\n"
          f"  only A right: {t.only_a:,}   only B right: {t.only_b:,}   both right: {t.both:,}   "
          f"both wrong: {t.neither:,}\n"
          f"  p = {t.p_value:.4g} (two-sided, binomial on the {t.only_a + t.only_b:,} images where they differ): "
          f"{verdict}")
    return t


# --------------------------------------------------------------------------- main

def main(experiment: str | None = None, tags: list[str] | tuple[str, ...] = (), out: str | Path = "reports",
         params: str | Path = "params.yaml", versus_models: tuple[str, str] | None = None) -> tuple[Path, Path]:
    from fmnist import plots, tracking
    from fmnist.files import save_figure, write_text

    tag_filter = parse_tags(tags)
    name = experiment or tracking.experiment_name()
    cells, untagged = group(tracking.finished_runs(name, tag_filter))
    if not cells:
        raise CompareError(f"no FINISHED run with test metrics and the fmnist.cell tag in experiment {name!r} at "
                           f"{tracking.tracking_uri()}" + (f" with tags {tag_filter}" if tag_filter else "")
                           + (f" ({untagged} older run(s) lack the tag: train them again)" if untagged else "")
                           + "; run `dvc repro` (or `fmnist train MODEL` and `fmnist evaluate MODEL`) first")
    cells = order(cells, params)
    diffs = differences(cells)
    text = markdown(cells, diffs, name, tag_filter, untagged)
    if versus_models:
        a, b = versus_models
        if missing := [m for m in (a, b) if not any(c.model == m for c in cells)]:
            raise CompareError(f"--versus: no runs of {', '.join(missing)} among these; models with runs: "
                               + ", ".join(sorted({c.model for c in cells})))
        runs_at = text.index("\n## Runs")
        text = text[:runs_at] + "\n".join(versus_markdown(cells, a, b)) + "\n" + text[runs_at:]
    out = Path(out)
    md, png, rel = out / "compare.md", out / "compare.png", out / "compare_reliability.png"
    write_text(md, text)
    save_figure(png, plots.interval_panels(
        accuracy_panels(cells, diffs), "test accuracy (%)", "{:.2f}",
        "Test accuracy per model: mean and 95% interval (filled: over seeds; open: one run, over the test images)"))
    panels, ncols = reliability_panels(cells)
    if any(p is not None for p in panels.values()):
        save_figure(rel, plots.reliability(panels, "Reliability on the test set, cross-entropy and focal loss side "
                                                   "by side (bins pooled over seeds)", ncols=ncols))
    else:
        save_figure(rel, plots.message("no run has logged calibration.json: run `fmnist evaluate MODEL` again"))
    wrote = [md, png, rel]
    curves, losses = loss_histories(diffs)
    if curves:
        wrote.append(out / "compare_curves.png")
        save_figure(wrote[-1], plots.loss_curves(curves, losses,
                                                  "Cross-entropy and focal loss, side by side: loss per epoch"))
    print(text)
    print("wrote " + ", ".join(map(str, wrote)))
    return md, png
