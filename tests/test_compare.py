"""`fmnist compare` on a scratch SQLite MLflow store holding runs made through the MLflow client, tagged
as the train stage tags them; and `fmnist compare --mcnemar` on two small predictions.csv files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from scipy import stats as sp

from fmnist import cli, tracking
from fmnist.commands import compare

from conftest import REPO

EXPERIMENT = "compare-test"
LINEAR_CE, LINEAR_FOCAL = "linear/ce/project/aaaa1111", "linear/focal/project/cccc3333"
PAIR_HASH = {"linear": "bbbb2222", "tinyvgg": "dddd0000", "zzz_custom": "eeee0000", "fmnet": "ffff0000",
             "mlp": "abab0000", "mlp512": "cdcd0000"}
PUBLISHED = "published-test"


def bins(shift: float, count: int) -> list[dict]:
    """calibration.json's bins: all images in the last two bins, accuracy ``shift`` below confidence."""
    rows = []
    for b in range(15):
        n = count if b >= 13 else 0
        conf = (b + 0.5) / 15 if n else None
        rows.append({"bin_lo": b / 15, "bin_hi": (b + 1) / 15, "count": n, "confidence": conf,
                     "accuracy": conf - shift if n else None, "count_ts": n, "confidence_ts": conf,
                     "accuracy_ts": conf if n else None})
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One store for the module (creating its schema takes seconds): runs at known start times."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    other = c.create_experiment("other", artifact_location=(root / "other").as_uri())
    ids = {}

    def run(cell, seed, t, metrics, status="FINISHED", experiment=exp, calibration=None, history=False, params=None,
            **tags):
        """``cell``: model/loss/recipe/hash; its pair: model/recipe/pair hash (the loss settings left out)."""
        model, loss, recipe, _ = cell.split("/")
        pair = f"{model}/{recipe}/{PAIR_HASH[model]}"
        r = c.create_run(experiment, start_time=t, tags={"model": model, "loss": loss, "recipe": recipe,
                                                         "fmnist.cell": cell, "fmnist.pair": pair, **tags})
        rid = r.info.run_id
        c.log_param(rid, "seed", str(seed))
        for k, v in (params or {}).items():
            c.log_param(rid, k, v)
        for k, v in metrics.items():
            c.log_metric(rid, k, v)
        if history:
            for epoch, (tl, vl) in enumerate(((1.0, 0.9), (0.6, 0.7)), start=1):
                c.log_metric(rid, "train_loss", tl, step=epoch)
                c.log_metric(rid, "val_loss", vl, step=epoch)
        if calibration is not None:
            c.log_dict(rid, {"temperature": 1.5, "bins": calibration}, "calibration.json")
        c.set_terminated(rid, status)
        ids[(cell, seed, t)] = rid
        return rid

    def m(acc, nll, ece, **more):
        return {"test_accuracy": acc, "test_nll": nll, "test_ece": ece, "test_nll_ts": nll - 0.01,
                "test_ece_ts": ece / 2, "temperature": 1.5, "train_time_s": 5.0, **more}

    # linear: three seeds of cross-entropy and of focal loss, paired
    run(LINEAR_CE, 1, 500, m(0.111, 2.0, 0.5))  # seed 1's older run: the latest one below wins
    run(LINEAR_CE, 1, 1000, m(0.80, 0.60, 0.02), calibration=bins(0.05, 100), history=True)
    run(LINEAR_CE, 2, 1100, m(0.82, 0.55, 0.03), calibration=bins(0.15, 300))
    run(LINEAR_CE, 3, 1200, m(0.84, 0.50, 0.04))
    run(LINEAR_CE, 4, 3000, m(0.999, 0.01, 0.01), status="FAILED")  # not finished: ignored
    run(LINEAR_CE, 5, 4000, {"train_time_s": 2.0})  # trained, never evaluated: ignored
    run(LINEAR_FOCAL, 1, 1300, m(0.805, 0.62, 0.010), calibration=bins(0.0, 100), history=True,
        dvc_exp_name="focal-exp")
    run(LINEAR_FOCAL, 2, 1400, m(0.835, 0.58, 0.015))
    run(LINEAR_FOCAL, 3, 1500, m(0.845, 0.53, 0.020))
    # tinyvgg: one seed of each
    run("tinyvgg/ce/project/dddd4444", 42, 1600, m(0.88, 0.35, 0.05, test_nll_se=0.01))
    run("tinyvgg/focal/project/dddd4444", 42, 1700, m(0.89, 0.33, 0.03, test_nll_se=0.01))
    run("zzz_custom/ce/project/eeee5555", 0, 1800, m(0.50, 1.20, 0.10))  # not in params.yaml: after those that are
    untagged = c.create_run(exp, start_time=1900, tags={"model": "mlp", "loss": "ce"})  # trained before the tags
    c.log_metric(untagged.info.run_id, "test_accuracy", 0.977)
    c.set_terminated(untagged.info.run_id, "FINISHED")
    run("fmnet/focal/project/ffff6666", 0, 1700, m(0.93, 0.21, 0.01), experiment=other)
    # published recipes (the published figures: linear 83.43%, mlp 75.02%, tinyvgg 88.06%, mlp512 64.6%)
    pub = c.create_experiment(PUBLISHED, artifact_location=(root / "published").as_uri())
    for seed, acc in ((1, 0.82), (2, 0.83), (3, 0.84)):
        run("linear/ce/published/abcd0001", seed, 2000 + seed, m(acc, 0.48, 0.01), experiment=pub,
            params={"arch": "linear", "hparams.hidden": "10"})
    for seed, acc in ((1, 0.80), (2, 0.81), (3, 0.805)):
        run("mlp/ce/published/abcd0002", seed, 2100 + seed, m(acc, 0.55, 0.01), experiment=pub,
            params={"arch": "mlp", "hparams.hidden": "10"})
    run("tinyvgg/ce/published/abcd0003", 1, 2200, m(0.88, 0.33, 0.01), experiment=pub,
        params={"arch": "tinyvgg", "hparams.hidden_units": "10"})
    run("mlp512/ce/published/abcd0004", 1, 2300, m(0.70, 0.9, 0.01), experiment=pub,
        params={"arch": "mlp", "hparams.hidden": "256"})  # not the published architecture
    run("linear/ce/project/abcd0005", 1, 2400, m(0.85, 0.45, 0.01), experiment=pub,
        params={"arch": "linear", "hparams.hidden": "10"})  # the project's recipe
    return {"uri": uri, "ids": ids}


@pytest.fixture
def env(store, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    return tmp_path / "out"


def section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def row(text: str, first: str) -> list[str]:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {first} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def t_interval(values: list[float], scale: float = 100, decimals: int = 2) -> str:
    """'[lo, hi]' by scipy, as compare.md writes it."""
    lo, hi = sp.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=sp.sem(values))
    return f"[{scale * lo:.{decimals}f}, {scale * hi:.{decimals}f}]"


def test_cells_over_seeds_with_intervals(env, capsys):
    md, png = compare.main(out=env, params=REPO / "params.yaml")
    text = md.read_text()
    assert text in capsys.readouterr().out  # printed too
    for name in ("compare.png", "compare_reliability.png", "compare_curves.png"):
        assert (env / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name

    acc = section(text, "Test accuracy and NLL")
    cells = [line.split("|")[1].strip() for line in acc.splitlines() if line.startswith("| ") and "cell" not in line]
    assert cells == ["linear, cross-entropy", "linear, focal loss", "tinyvgg, cross-entropy", "tinyvgg, focal loss",
                     "zzz_custom, cross-entropy"]  # params.yaml's order, then the others; ce before focal

    # three seeds: the t interval over them (the older, failed and unevaluated runs left out)
    name, n, accuracy, sd, nll = row(acc, "linear, cross-entropy")
    assert n == "3" and accuracy == "82.00% " + t_interval([0.80, 0.82, 0.84]) and sd == "2.00"
    assert nll == "0.5500 " + t_interval([0.60, 0.55, 0.50], scale=1, decimals=4)
    # one seed: Wilson on the 10,000 test images, the NLL +- 1.96 standard errors, marked as such
    name, n, accuracy, sd, nll = row(acc, "tinyvgg, cross-entropy")
    wilson = sp.binomtest(8800, 10_000).proportion_ci(0.95, method="wilson")
    assert n == "1" and sd == "-"
    assert accuracy == f"88.00% [{100 * wilson.low:.2f}, {100 * wilson.high:.2f}]{compare.ONE_RUN}"
    z = sp.norm.ppf(0.975)
    assert nll == f"0.3500 [{0.35 - z * 0.01:.4f}, {0.35 + z * 0.01:.4f}]{compare.ONE_RUN}"
    assert "11.10%" not in acc and "99.90%" not in acc and "97.70%" not in acc and "fmnet" not in text
    assert "1 older run(s) without the `fmnist.cell` tag are left out" in text

    calib = section(text, "Calibration")
    _, n, ece, nll_ts, ece_ts, temperature = row(calib, "linear, cross-entropy")
    assert ece == "3.00% " + t_interval([0.02, 0.03, 0.04]) and ece_ts == "1.50% " + t_interval([0.01, 0.015, 0.02])
    assert temperature == "1.50 [1.50, 1.50]"
    assert row(calib, "tinyvgg, cross-entropy")[2] == "5.00% (one run)"  # ECE of one run: no interval


def test_focal_minus_cross_entropy_paired_by_seed(env):
    md, _ = compare.main(out=env, params=REPO / "params.yaml")
    paired = section(md.read_text(), "Focal loss minus cross-entropy, paired by seed")
    _, seeds, accuracy, nll, ece, nll_ts, ece_ts = row(paired, "linear")
    assert seeds == "1, 2, 3"
    d_acc = [0.805 - 0.80, 0.835 - 0.82, 0.845 - 0.84]  # +0.83 points, but the interval holds 0
    lo, hi = sp.t.interval(0.95, 2, loc=sum(d_acc) / 3, scale=sp.sem(d_acc))
    assert lo < 0 < hi
    assert accuracy == f"+0.83 pts [{100 * lo:+.2f}, {100 * hi:+.2f}]: {compare.NO_DIFFERENCE}"
    assert nll.startswith("+0.0267 [+0.01") and compare.NO_DIFFERENCE not in nll  # focal's NLL is higher, seed by seed
    assert ece.startswith("-1.50 pts [-2.7") and compare.NO_DIFFERENCE not in ece
    assert nll_ts.startswith("+0.0267 [") and ece_ts.startswith("-0.75 pts [")  # after temperature scaling too
    _, seeds, accuracy, nll, ece, nll_ts, ece_ts = row(paired, "tinyvgg")
    assert seeds == "42 only: a second seed is needed for an interval" and accuracy == "+1.00 pts (no interval)"
    assert "zzz_custom" not in paired  # no focal cell


def test_reliability_bins_pool_over_seeds(env, store):
    cells = compare.order(compare.group(tracking.finished_runs(EXPERIMENT))[0], REPO / "params.yaml")
    ce = next(c for c in cells if c.key == LINEAR_CE)
    pooled, k = compare.pooled_bins(ce)  # seeds 1 and 2 logged calibration.json, seed 3 did not
    assert k == 2
    assert [r["count"] for r in pooled] == [0] * 13 + [400, 400]
    assert pooled[0]["confidence"] is None and pooled[0]["accuracy"] is None
    assert pooled[14]["confidence"] == pytest.approx(14.5 / 15)
    assert pooled[14]["accuracy"] == pytest.approx(14.5 / 15 - (100 * 0.05 + 300 * 0.15) / 400)
    panels, ncols = compare.reliability_panels(cells)
    assert ncols == 4  # cross-entropy and focal side by side, two models a row
    assert list(panels) == ["linear, cross-entropy (2 of 3 runs pooled)", "linear, focal loss (1 of 3 runs pooled)",
                            "tinyvgg, cross-entropy (1 run)", "tinyvgg, focal loss (1 run)",
                            "zzz_custom, cross-entropy (1 run)", "zzz_custom, focal loss"]  # no focal run: a gap
    assert panels["linear, cross-entropy (2 of 3 runs pooled)"] == pooled
    assert panels["tinyvgg, cross-entropy (1 run)"] is None and panels["zzz_custom, focal loss"] is None


def test_published_figures_against_the_runs_of_their_recipe(env):
    md, _ = compare.main(experiment=PUBLISHED, out=env, params=REPO / "params.yaml")
    text = md.read_text()
    table = section(text, "Published figures against the same recipe here")
    assert [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("| ")] == [
        "linear", "mlp", "tinyvgg"]  # mlp512 (another width) and the project's recipe have no figure
    _, source, figure, here, spread, verdict, loss, nll = row(table, "linear")
    assert figure == "83.43%" and here == "3, 83.00% " + t_interval([0.82, 0.83, 0.84])
    assert spread == "82.00 to 84.00%" and loss == "0.4766 (test)"
    sd = sp.tstd([0.82, 0.83, 0.84])
    lo, hi = sp.t.interval(0.95, 2, loc=0.83, scale=sd * (1 + 1 / 3) ** 0.5)
    assert verdict == f"[{100 * lo:.2f}, {100 * hi:.2f}]: inside"
    assert row(table, "mlp")[5].endswith(": below")  # 75.02% published, 80-81% here over three seeds
    assert row(table, "tinyvgg")[5] == compare.SECOND_SEED
    assert "Published figures" not in compare.main(out=env, params=REPO / "params.yaml")[0].read_text()


def test_filters_by_experiment_and_tag(env):
    md, _ = compare.main(tags=["dvc_exp_name=focal-exp"], out=env, params=REPO / "params.yaml")
    text = md.read_text()
    assert row(section(text, "Test accuracy and NLL"), "linear, focal loss")[1] == "1" and "tinyvgg" not in text
    assert "No model has both a cross-entropy and a focal-loss cell" in text

    md, _ = compare.main(experiment="other", out=env, params=REPO / "params.yaml")
    assert row(section(md.read_text(), "Test accuracy and NLL"), "fmnet, focal loss")[2].startswith("93.00% [")


def test_clear_errors(env, capsys):
    with pytest.raises(tracking.TrackingError, match="no MLflow experiment 'nope'.*compare-test"):
        compare.main(experiment="nope", out=env)
    with pytest.raises(compare.CompareError, match="no FINISHED run with test metrics"):
        compare.main(tags=["dvc_exp_name=none-such"], out=env)
    with pytest.raises(compare.CompareError, match=r"\(1 older run\(s\) lack the tag"):
        compare.main(tags=["model=mlp"], out=env)
    with pytest.raises(compare.CompareError, match="expected KEY=VALUE"):
        compare.parse_tags(["model"])
    assert cli.main(["compare", "--experiment", "nope", "--out", str(env)]) == 1
    assert capsys.readouterr().err.startswith("fmnist compare: error: no MLflow experiment 'nope'")
    assert not env.exists()


# --------------------------------------------------------------------------- McNemar

def write_predictions(path: Path, right: list[bool], order: list[int] | None = None) -> Path:
    """An evaluate predictions.csv: image i is right where ``right[i]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "actual", "predicted", "confidence"])
        w.writeheader()
        for i in order or range(len(right)):
            w.writerow({"index": i, "actual": "Bag", "predicted": "Bag" if right[i] else "Coat", "confidence": 0.9})
    return path


def test_mcnemar_on_two_predictions_files(tmp_path, monkeypatch, fmnist):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    monkeypatch.chdir(tmp_path)
    a = [True] * 8 + [True, True, True, False] + [False] * 3  # only A right: 3 (+1 below), only B right: 1
    b = [True] * 8 + [False, False, False, True] + [False] * 3
    a[13] = True
    write_predictions(tmp_path / "reports/eval/mlp/predictions.csv", a)
    other = write_predictions(tmp_path / "b.csv", b, order=list(range(len(b)))[::-1])  # another row order

    t = compare.mcnemar("mlp", str(other))  # a model name, and a path
    assert (t.only_a, t.only_b, t.both, t.neither) == (4, 1, 8, 2)
    assert t.p_value == pytest.approx(12 / 32)  # two-sided exact: P(X <= 1 or X >= 4), X ~ Bin(5, 1/2)
    rc, out, err = fmnist("compare", "--mcnemar", "mlp", str(other))
    assert rc == 0, err
    assert "only A right: 4   only B right: 1   both right: 8   both wrong: 2" in out
    assert "p = 0.375" in out and compare.NO_DIFFERENCE in out and "reports/eval/mlp/predictions.csv" in out

    many_a, many_b = [True] * 30 + [False] * 30, [False] * 30 + [False] * 30  # 30 against 0: p = 2 / 2^30
    t = compare.mcnemar(str(write_predictions(tmp_path / "a2.csv", many_a)),
                        str(write_predictions(tmp_path / "b2.csv", many_b)))
    assert t.p_value == pytest.approx(2 * 0.5 ** 30) and t.p_value < 0.05

    write_predictions(tmp_path / "short.csv", b[:-1])
    with pytest.raises(compare.CompareError, match="score different images"):
        compare.mcnemar("mlp", str(tmp_path / "short.csv"))
    rc, _, err = fmnist("compare", "--mcnemar", "mlp", "nope")
    assert rc == 1 and "--mcnemar nope: no such file, nor reports/eval/nope/predictions.csv" in err


def test_an_interval_is_not_shown_below_zero():
    from fmnist import stats
    from fmnist.commands import compare

    s = stats.summary([0.001, 0.002, 0.030])  # an ECE over three seeds: the t interval reaches below 0
    assert s.lo < 0
    assert compare.shown(s, "test_ece").endswith(f"[0.00, {100 * s.hi:.2f}]")


def test_two_seeds_that_agree_keep_the_test_sets_noise():
    runs = {str(seed): {"metrics": {"test_accuracy": 0.9275, "test_nll": 0.21 + seed / 1000, "test_nll_se": 0.007}}
            for seed in (1, 42)}
    s = compare.summaries(compare.Cell("cnn_bn/ce/project/x", "cnn_bn/project/y", "cnn_bn", "ce", "project", runs))
    wilson = sp.binomtest(9275, 10_000).proportion_ci(0.95, method="wilson")
    assert s["test_accuracy"].n == 2 and s["test_accuracy"].sd == 0  # the seeds' own t interval has no width
    assert (s["test_accuracy"].lo, s["test_accuracy"].hi) == (pytest.approx(wilson.low), pytest.approx(wilson.high))
    z = sp.norm.ppf(0.975)
    assert s["test_nll"].lo == pytest.approx(min(0.2515 - z * 0.007, s["test_nll"].lo))
    assert s["test_nll"].hi - s["test_nll"].lo >= 2 * z * 0.007 - 1e-12
    wide = compare.Cell("mlp/ce/project/x", "mlp/project/y", "mlp", "ce", "project",
                        {str(i): {"metrics": {"test_accuracy": a}} for i, a in enumerate((0.58, 0.80, 0.85))})
    assert compare.shown(compare.summaries(wide)["test_accuracy"], "test_accuracy").endswith(", 100.00]")


def test_one_model_against_another_paired_by_seed(env):
    md, _ = compare.main(out=env, params=REPO / "params.yaml", versus_models=("linear", "tinyvgg"))
    text = md.read_text()
    table = section(text, "linear minus tinyvgg, paired by seed")
    ce = row(table, "cross-entropy")
    assert ce[1] == "project" and ce[2] == "none in common"  # tinyvgg has seed 42 only, linear 1 to 3
    assert ce[3] == "-"
    assert text.index("paired by seed\n\n| loss") < text.index("## Runs")  # before the runs table
    pairs = compare.versus(compare.order(compare.group(tracking.finished_runs(EXPERIMENT))[0],
                                         REPO / "params.yaml"), "linear", "linear")
    ce_ce = [p for p in pairs if p[0].loss == p[1].loss == "ce"][0]
    assert ce_ce[2] == ["1", "2", "3"] and ce_ce[3]["test_accuracy"].mean == 0  # a model against itself: 0
    with pytest.raises(compare.CompareError, match="no runs of resnet"):
        compare.main(out=env, params=REPO / "params.yaml", versus_models=("linear", "resnet"))
