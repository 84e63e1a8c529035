"""The report stage on synthetic train/eval outputs, and the dvc.yaml that runs and plots it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, specs
from fmnist import checkpoint, published, stats
from fmnist.commands import report
from fmnist.core import models
from fmnist.data import CLASSES
from fmnist.data.loader import Stats, load_split
from fmnist.files import atomic_path, write_csv, write_json
from fmnist.runspec import RunPaths

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_params(root: Path, names: list[str], processed: Path, *overrides: str, **train) -> dict:
    """A repository root with params.yaml of these models and the processed data; their run specs."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["models"] = {n: raw["models"][n] for n in names}
    raw["evaluate"]["models"] = {n: v for n, v in raw["evaluate"]["models"].items() if n in names}
    raw["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(processed, root / "data/processed")
    return specs(*overrides, params=root / "params.yaml")


def fake_results(specs: dict, accuracy: dict[str, float], val: dict[str, tuple[float, float]] | None = None):
    """What train@M and evaluate@M would write: metrics, history, predictions, per-class scores,
    calibration bins and a checkpoint (an untrained model of the right architecture). ``val``: each
    model's validation accuracy and NLL (default: the test accuracy, and 1 minus it)."""
    test = load_split("test")
    for k, (name, spec) in enumerate(specs.items()):
        model = models.build(spec.arch, spec.hparams)
        checkpoint.save(f"models/{name}.pt", model, spec, Stats(0.29, 0.35), run_id=None, bf16=False)
        epochs = 3
        write_csv(f"reports/train/{name}/history.csv",
                  [{"epoch": e, "train_loss": 1.5 / e, "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.4 / e + 0.05,
                    "val_accuracy": 0.5 + 0.1 * e, "lr": 0.001, "elapsed_s": e} for e in range(1, epochs + 1)])
        write_json(f"reports/train/{name}/metrics.json",
                   {"epochs": epochs, "best_epoch": epochs, "train_time_s": 10.0 * (k + 1), "images_per_s": 540.0,
                    "n_parameters": models.count_parameters(model), "n_train": 540})
        fake_eval(name, accuracy[name], *(val or {}).get(name, (accuracy[name], 1 - accuracy[name])))


def fake_eval(name: str, accuracy: float, val_accuracy: float, val_nll: float) -> None:
    """What evaluate@M would write, with these test and validation figures."""
    test = load_split("test")
    # Wrong on the first (1 - accuracy) share of the test images: predicted as the next class.
    n_wrong = round((1 - accuracy) * len(test))
    rows = []
    for i, (idx, y) in enumerate(zip(test.index.tolist(), test.labels.tolist())):
        p = (y + 1) % 10 if i < n_wrong else y
        rows.append({"index": idx, "actual": CLASSES[y], "predicted": CLASSES[p],
                     "confidence": round(0.5 + 0.4 * ((i * 7) % 10) / 10, 4)})
    write_csv(f"reports/eval/{name}/predictions.csv", rows)
    write_json(f"reports/eval/{name}/per_class.json",
               {c: {"precision": 0.9, "recall": 0.8, "f1": 0.85} for c in CLASSES})
    write_json(f"reports/eval/{name}/metrics.json",
               {"test_accuracy": accuracy, "test_nll": 1 - accuracy, "test_nll_se": 0.01, "test_ece": 0.0512,
                "test_brier": 0.2, "test_nll_ts": 0.9 - accuracy, "test_ece_ts": 0.0123, "test_brier_ts": 0.19,
                "temperature": 1.5, "val_accuracy": val_accuracy, "val_nll": val_nll, "macro_f1": 0.85})
    # 15 bins, the lower ones empty (empty cells), as the evaluate stage writes them
    bins = [{"bin_lo": b / 15, "bin_hi": (b + 1) / 15, "count": 0, "confidence": "", "accuracy": "",
             "count_ts": 0, "confidence_ts": "", "accuracy_ts": ""} for b in range(15)]
    for b in range(7, 15):
        mid = (b + 0.5) / 15
        bins[b].update(count=10 * b, confidence=mid, accuracy=mid - 0.05, count_ts=10 * b, confidence_ts=mid - 0.03,
                       accuracy_ts=mid - 0.04)
    write_csv(f"reports/eval/{name}/calibration.csv", bins)


def linked_figures(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def table_rows(md: str, ncells: int = 14, key: int = 1) -> dict[str, str]:
    """The rows of the markdown table with ``ncells`` cells, by the model named in cell ``key``."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == ncells and cells[key] not in ("model", "---") and line.startswith("|"):
            rows[cells[key].strip("*")] = line
    return rows


def published_rows(md: str) -> dict[str, str]:
    return table_rows(md, ncells=9, key=0)


def test_report_rows_best_published_and_figures(workdir, processed_dir):
    s = write_params(workdir, ["linear", "mlp", "tinyvgg", "cnn_bn"], processed_dir)
    fake_results(s, {"linear": 0.85, "mlp": 0.70, "tinyvgg": 0.80, "cnn_bn": 0.82})
    path = report.run(s)
    md = path.read_text()

    rows = table_rows(md)
    assert list(rows) == ["linear", "mlp", "tinyvgg", "cnn_bn"]  # params.yaml's order, one row each
    assert "★ best" in rows["linear"] and "best" not in rows["mlp"] + rows["tinyvgg"]
    assert "85.00%" in rows["linear"] and "| ce | project |" in rows["mlp"]
    n_linear = models.count_parameters(models.build("linear", s["linear"].hparams))
    assert f"{n_linear:,}" in rows["linear"]
    # the project's recipe: published figures are shown with the recipe that made them, never subtracted
    pub = published_rows(md)
    assert "83.43%" in pub["linear"] and "SGD lr 0.1, batch 32, 3 epochs, [0, 1] inputs" in pub["linear"]
    assert "not compared: this run used the project recipe" in pub["linear"] and " pp" not in pub["linear"]
    assert "29.97 s" in pub["linear"]  # the source's own time, as published
    assert "not published" in pub["cnn_bn"] and "Adam* lr 0.001*" in pub["cnn_bn"]

    names = sorted(Path(p).name for p in linked_figures(md))
    # best fully connected model: linear; best CNN: cnn_bn; kernels of the best CNN (cnn_bn) only once
    assert names == sorted(["accuracy_time.png", "loss_curves.png", "data_samples.png", "confusion_best.png",
                            "reliability.png", "correct_linear.png", "misclassified_linear.png", "correct_cnn_bn.png",
                            "misclassified_cnn_bn.png", "kernels_cnn_bn.png"])
    assert "First conv layer of cnn_bn" in md  # the best model has no conv layer; the best CNN is used
    for link in linked_figures(md):
        assert (path.parent / link).read_bytes().startswith(PNG_MAGIC), link
    assert sorted(p.name for p in report.FIGURES.iterdir()) == names  # nothing else in the folder
    assert "timestamp" not in md.lower() and not re.search(r"\d{4}-\d\d-\d\d", md)


def test_the_best_model_is_chosen_on_validation_and_tested_against_the_runner_up(workdir, processed_dir):
    s = write_params(workdir, ["linear", "mlp", "tinyvgg"], processed_dir)
    # linear is the most accurate on the test set, but not on validation; mlp and tinyvgg tie on
    # validation accuracy, and mlp has the lower validation NLL.
    fake_results(s, {"linear": 0.90, "mlp": 0.80, "tinyvgg": 0.79},
                 val={"linear": (0.80, 0.50), "mlp": (0.85, 0.30), "tinyvgg": (0.85, 0.35)})
    md = report.run(s).read_text()
    rows = table_rows(md)
    assert "★ best" in rows["mlp"] and "best" not in rows["linear"] + rows["tinyvgg"]
    assert "Best model: **mlp**" in md and "validation accuracy **85.00%**" in md
    assert "the highest validation accuracy (ties: the lower validation NLL" in md
    n_test = len(load_split("test"))
    lo, hi = stats.wilson(round(0.9 * n_test), n_test)
    assert f"| 90.00% ({100 * lo:.2f}–{100 * hi:.2f}) |" in rows["linear"]  # the 95% interval, Wilson
    assert "| 80.00% | 90.00% (" in rows["linear"]  # validation, then test accuracy
    assert "| 0.1000 | 5.12% | 1.23% |" in rows["linear"]  # test NLL, ECE before and after temperature scaling
    # McNemar, best against the runner-up: mlp is wrong on the first 40 test images, tinyvgg on the first 42
    m = stats.mcnemar([i >= 40 for i in range(n_test)], [i >= 42 for i in range(n_test)])
    assert (m.only_a, m.only_b) == (2, 0)
    assert (f"McNemar's exact test on the same {n_test} test images: only mlp right on 2, only tinyvgg right on 0 "
            f"(both right on {n_test - 42}, both wrong on 40); p = 0.5: no difference shown.") in md
    assert (report.FIGURES / "reliability.png").read_bytes().startswith(PNG_MAGIC)

    fake_eval("tinyvgg", 0.60, 0.85, 0.35)  # now clearly worse on the test set
    md = report.run(s).read_text()
    assert "only mlp right on 40, only tinyvgg right on 0" in md and "in favour of mlp" in md
    assert "★ best" in table_rows(md)["mlp"]  # the test set still decides nothing


def test_under_the_published_recipe_the_report_subtracts(workdir, processed_dir):
    s = write_params(workdir, ["linear", "tinyvgg", "fmnet"], processed_dir, "recipe=published")
    assert (s["linear"].recipe, s["fmnet"].recipe, s["fmnet"].fallback) == ("published", "project", True)
    fake_results(s, {"linear": 0.85, "tinyvgg": 0.80, "fmnet": 0.9})
    md = report.run(s).read_text()
    pub = published_rows(md)
    assert "83.43%" in pub["linear"] and "85.00%" in pub["linear"] and "+1.57 pp" in pub["linear"]
    assert "-8.06 pp" in pub["tinyvgg"] and "0.3239 (test)" in pub["tinyvgg"] and "37.13 s" in pub["tinyvgg"]
    assert "| published |" in table_rows(md)["linear"]
    assert "project (no published recipe)" in table_rows(md)["fmnet"]
    names = {Path(p).name for p in linked_figures(md)}
    assert {"kernels_fmnet.png", "correct_linear.png", "correct_fmnet.png"} <= names  # fmnet is the best CNN


def test_report_is_deterministic_and_works_without_a_cnn(workdir, processed_dir):
    s = write_params(workdir, ["linear", "mlp"], processed_dir)
    fake_results(s, {"linear": 0.75, "mlp": 0.90})
    (workdir / "reports/figures").mkdir(parents=True)
    (workdir / "reports/figures/conv_kernels.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    report.run(s)
    first = {p.name: p.read_bytes() for p in [report.REPORT, *sorted(report.FIGURES.iterdir())]}
    md = report.REPORT.read_text()
    assert "★ best" in table_rows(md)["mlp"]
    assert "conv_kernels.png" not in first and "no kernel figure" in md
    assert not any(n.startswith(("kernels_", "correct_cnn")) for n in first)
    for link in linked_figures(md):
        assert (report.REPORT.parent / link).read_bytes().startswith(PNG_MAGIC)

    report.run(s)
    again = {p.name: p.read_bytes() for p in [report.REPORT, *sorted(report.FIGURES.iterdir())]}
    assert again == first


def test_missing_eval_results_name_the_file(workdir, processed_dir):
    s = write_params(workdir, ["linear", "mlp"], processed_dir)
    fake_results(s, {"linear": 0.8, "mlp": 0.7})
    Path("reports/eval/mlp/metrics.json").unlink()
    with pytest.raises(report.ReportError, match=r"reports/eval/mlp/metrics\.json: missing; run `dvc repro`"):
        report.run(s)
    assert not report.REPORT.exists()


def test_report_reads_what_the_train_and_evaluate_stages_write(workdir, processed_dir):
    from fmnist.commands import evaluate, train

    s = write_params(workdir, ["linear", "tinyvgg"], processed_dir, epochs=1, device="cpu", precision="fp32")
    for spec in s.values():
        train.run(spec, progress=False)
        evaluate.run(spec)
    md = report.run(s).read_text()
    assert list(table_rows(md)) == ["linear", "tinyvgg"]
    assert all((report.REPORT.parent / link).is_file() for link in linked_figures(md))
    # evaluate logged its figures to each model's MLflow run
    logged = sorted(p.name for p in (workdir / "mlartifacts").rglob("*.png"))
    assert logged == ["confusion_matrix.png", "confusion_matrix.png", "per_class.png", "per_class.png",
                      "reliability.png", "reliability.png"]


def test_published_figures_need_the_same_architecture_and_loss():
    assert published.figure("linear", "ce", {"hidden": 10}).test_accuracy == 0.8343
    assert published.figure("linear", "ce", {"hidden": 20}) is None  # another architecture
    assert published.figure("linear", "focal", {"hidden": 10}) is None
    assert published.figure("mlp512", "ce", {"hidden": 512}).test_accuracy == 0.646
    assert published.figure("mlp512", "focal", {"hidden": 512}).loss_kind == "validation"
    assert published.figure("fmnet", "ce", {}) is None


def test_dvc_yaml_report_stage_and_plots_cover_every_model():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    names = list(yaml.safe_load((REPO / "params.yaml").read_text())["models"])
    stage = dvc["stages"]["report"]
    assert stage["cmd"] == "fmnist report"
    assert {"reports/train", "reports/eval", "models"} <= set(stage["deps"])
    assert stage["params"] == ["loss", "recipe", "train.label_smoothing", "models"]
    outs = {k: v for o in stage["outs"] for k, v in o.items()}
    assert outs == {"reports/report.md": {"cache": False}, "reports/figures": {"cache": False}}

    curves = [next(iter(p.items())) for p in dvc["plots"]]
    assert {title for title, _ in curves} == {"Validation loss", "Training loss", "Validation accuracy"}
    for title, spec in curves:
        assert spec["x"] == "epoch"
        assert set(spec["y"]) == {f"reports/train/{n}/history.csv" for n in names}, title
        template = REPO / ".dvc/plots" / f"{spec['template']}.json"
        assert json.loads(template.read_text())["encoding"]["color"]["field"] == "model"

    assert {n: a["path"] for n, a in dvc["artifacts"].items()} == {n: f"models/{n}.pt" for n in names}
    assert {a["type"] for a in dvc["artifacts"].values()} == {"model"}

    confusion = dvc["stages"]["evaluate"]["do"]["plots"][0]["reports/eval/${key}/predictions.csv"]
    assert (confusion["template"], confusion["x"], confusion["y"]) == ("confusion", "actual", "predicted")


def test_train_and_evaluate_stages_can_use_the_run_cache():
    """DVC 3.67 saves no run-cache entry for a stage with a plain output marked cache: false (only
    metrics and plots are exempt), and would train a model again instead of restoring it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name in ("train", "evaluate"):
        stage = dvc["stages"][name]["do"]
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            assert opts.get("cache", True), f"{name}: {path} is a plain output with cache: false"
    assert dvc["stages"]["evaluate"]["do"]["params"] == ["evaluate"]  # evaluation settings never retrain
    assert "evaluate" not in dvc["stages"]["train"]["do"]["params"]


def stage_paths(dvc: dict, models: list[str]) -> dict[str, set[Path]]:
    """Every path a stage of dvc.yaml depends on or writes, foreach stages expanded for ``models``."""
    out: dict[str, set[Path]] = {}
    for name, stage in dvc["stages"].items():
        body, keys = (stage["do"], models) if "foreach" in stage else (stage, [None])
        for key in keys:
            paths = set()
            for section in ("deps", "outs", "metrics", "plots"):
                for entry in body.get(section, []):
                    path = next(iter(entry)) if isinstance(entry, dict) else entry
                    paths.add(Path(path.replace("${key}", key or "")))
            out[f"{name}@{key}" if key else name] = paths
    return out


def test_no_working_file_lands_in_what_a_stage_depends_on(tmp_path):
    """An interrupted training leaves its resume state, and a killed writer its temp file: neither may
    change a stage's dependencies (the report and register stages depend on models/ as a whole)."""
    from dvc.repo import Repo

    models = list(yaml.safe_load((REPO / "params.yaml").read_text())["models"])
    paths = stage_paths(yaml.safe_load((REPO / "dvc.yaml").read_text()), models)
    assert Path("models") in paths["report"] and Path("models") in paths["register"]
    for m in models:
        resume = RunPaths.of(m).resume
        inside = [f"{stage}: {p}" for stage, ps in paths.items() for p in ps if resume.is_relative_to(p)]
        assert not inside, f"{resume} lies in what a stage depends on or writes: {inside}"

    # fmnist.files writes .NAME.XXXX.tmp beside each output; DVC must not hash one a killed writer left
    with atomic_path(tmp_path / "models" / "linear.pt") as tmp:
        left = tmp.name
    Repo.init(str(tmp_path / "dvc"), no_scm=True)
    shutil.copy(REPO / ".dvcignore", tmp_path / "dvc" / ".dvcignore")
    ignore = Repo(str(tmp_path / "dvc")).dvcignore
    for folder in ("models", "reports/eval/linear", "reports/figures", "data/processed"):
        assert ignore.is_ignored_file(str(tmp_path / "dvc" / folder / left)), folder
    assert not ignore.is_ignored_file(str(tmp_path / "dvc" / "models" / "linear.pt"))
