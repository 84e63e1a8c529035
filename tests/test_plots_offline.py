"""`dvc plots show` writes a page that draws every chart without internet: the repository's
.dvc/config points DVC at .dvc/plots/html/template.html, which inlines vendored vega builds.

The page is rendered in headless Chromium with every host name unresolvable, then checked for a
drawn chart in each plot and for no request of the page to the network (Chromium's net log).
DVC's own page, which loads the same libraries from a CDN, is the control: blank, and asking.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fmnist.commands.train import HISTORY_FIELDS
from fmnist.data import CLASSES
from fmnist.files import write_csv
from fmnist.runspec import RunPaths
from reliability_helpers import env

HTML = REPO / ".dvc/plots/html"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="renders the page in headless Chromium: apt-get install -y chromium")

INLINE_SCRIPT = re.compile(r"<script>\n.*?\n    </script>\n", re.S)  # the blocks vendor.page() writes
PLOT_ID = re.compile(r'<div id = "([^"]+)"')  # DVC's plot divs in the written page
CANVAS = re.compile(r'<canvas width="(\d+)" height="(\d+)"')


def vendor():
    """.dvc/plots/html/vendor.py, which writes the template."""
    spec = importlib.util.spec_from_file_location("vendor", HTML / "vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_is_the_vendored_builds_inlined():
    v = vendor()
    assert (HTML / "template.html").read_text(encoding="utf-8") == v.page(), \
        "template.html is not the vendored builds: run `python .dvc/plots/html/vendor.py`"
    for name, _, _ in v.PACKAGES:
        assert "Redistribution and use in source and binary forms" in (HTML / f"{name}.LICENSE").read_text(), name
    assert len(INLINE_SCRIPT.findall(v.page())) == len(v.PACKAGES)


def write_reports(root: Path, models: list[str]) -> None:
    """What train@M and evaluate@M write for the plots: a 3-epoch history, 40 test predictions and the
    reliability bins."""
    for k, name in enumerate(models):
        paths = RunPaths.of(name)
        write_csv(root / paths.history,
                  [{"epoch": e, "train_loss": 1.5 / e + 0.1 * k, "train_accuracy": 0.5 + 0.1 * e,
                    "val_loss": 1.4 / e + 0.1 * k, "val_accuracy": 0.5 + 0.1 * e - 0.02 * k, "lr": 0.001,
                    "elapsed_s": e} for e in range(1, 4)], HISTORY_FIELDS)
        write_csv(root / paths.predictions,
                  [{"index": i, "actual": CLASSES[i % 10], "predicted": CLASSES[(i + (i % 4 == k % 4)) % 10],
                    "confidence": 0.9} for i in range(40)])
        write_csv(root / paths.calibration,
                  [{"bin_lo": b / 15, "bin_hi": (b + 1) / 15, "count": 10, "confidence": (b + 0.5) / 15,
                    "accuracy": min(1.0, (b + 0.5) / 15 + 0.02 * k), "count_ts": 10, "confidence_ts": (b + 0.5) / 15,
                    "accuracy_ts": (b + 0.5) / 15} for b in range(15)])


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """dvc_plots/index.html as `dvc plots show` writes it in a repository with this one's dvc.yaml,
    params.yaml and .dvc/config and .dvc/plots/, and synthetic reports of every model."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml", ".dvc/config"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    write_reports(root, list(yaml.safe_load((REPO / "params.yaml").read_text())["models"]))
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=root, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "failed" not in proc.stderr.lower(), proc.stdout + proc.stderr
    return root / "dvc_plots/index.html"


def render(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """The page's DOM once Chromium has run its scripts offline (no host name resolves, no proxy),
    and the URLs the page asked the network for (Chromium's own background requests left out)."""
    netlog = tmp / "netlog.json"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
         "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
         f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={netlog}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [e["params"]["url"] for e in log["events"]
             if e["type"] == start and e["params"].get("network_isolation_key", "").startswith("file://")]
    return dom, [url for url in asked if not url.startswith("file:")]


def charts(dom: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    """Each plot div's canvas (width, height), where vega-embed drew one (in the div itself)."""
    starts = sorted((dom.index(f'<div id="{i}"'), i) for i in ids)
    found = {}
    for (begin, i), (end, _) in zip(starts, starts[1:] + [(len(dom), None)]):
        if m := CANVAS.search(dom, begin, end):
            found[i] = (int(m[1]), int(m[2]))
    return found


@needs_chromium
def test_plots_show_draws_every_chart_offline(page, tmp_path):
    html = page.read_text(encoding="utf-8")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    ids = PLOT_ID.findall(html)
    assert len(ids) == len(dvc["plots"]) + 3 * len(models)  # the curves; per model, history, confusion, reliability
    assert "<script src" not in html

    dom, asked = render(page, tmp_path)
    drawn = charts(dom, ids)
    assert sorted(drawn) == sorted(ids), f"no chart drawn in {sorted(set(ids) - set(drawn))}"
    assert all(w > 100 and h > 100 for w, h in drawn.values()), drawn
    assert asked == []


@needs_chromium
def test_dvc_default_page_is_blank_offline(page, tmp_path):
    """The control: the same page with DVC's CDN links instead of the inlined builds draws nothing,
    and the net log shows it asking the CDN. So the checks above can fail, and the network was off."""
    from dvc_render.vega import VegaRenderer

    html = page.read_text(encoding="utf-8")
    cdn = tmp_path / "cdn.html"
    cdn.write_text(INLINE_SCRIPT.sub("", html).replace("</title>", "</title>" + VegaRenderer.SCRIPTS, 1))
    dom, asked = render(cdn, tmp_path)
    assert charts(dom, PLOT_ID.findall(html)) == {}
    assert any("cdn.jsdelivr.net/npm/vega@" in url for url in asked), asked
