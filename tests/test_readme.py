"""The documentation holds together: every relative link in README.md and docs/*.md leads somewhere
(the file exists; a `#anchor` names a heading of its target, as GitHub slugs it), every docs page is
reachable from the README, and the code users copy runs as written: the Python blocks marked
`<!-- tested: NAME -->` are run here, exactly as they stand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_spec
from fmnist import checkpoint
from fmnist.core import models
from fmnist.data.loader import Stats

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
TESTED = ["load-with-fmnist", "load-with-torch"]  # every block marked tested, each run below

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text as GitHub renders links in it: fenced blocks and code spans hold no links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation but `-` and `_`
    dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[`*]", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        s = slug(heading)
        out.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of a markdown page that lead nowhere, each with the reason."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_slugs_are_githubs():
    assert slug("Why you might not want to use this") == "why-you-might-not-want-to-use-this"
    assert slug("The daily loop: `dvc exp`") == "the-daily-loop-dvc-exp"
    assert slug("Seeds, intervals and calibration") == "seeds-intervals-and-calibration"
    assert slug("params.yaml") == "paramsyaml"
    assert slug("`dvc status` reports `src/fmnist/core` modified") == "dvc-status-reports-srcfmnistcore-modified"
    assert slug("Tracking, models, the champion, serving") == "tracking-models-the-champion-serving"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# B page\n\n## Repeated\n\n## Repeated\n")
    page = tmp_path / "a.md"
    page.write_text("# A\n[ok](b.md) [ok](b.md#b-page) [ok](b.md#repeated-1) [ok](#a) [web](https://x.org/y)\n"
                    "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
                    "[gone](missing.md) [no heading](b.md#nope) ![no image](fig.png)\n")
    assert broken_links(page) == [f"missing.md: no file {tmp_path / 'missing.md'}",
                                  "b.md#nope: no heading #nope in b.md", f"fig.png: no file {tmp_path / 'fig.png'}"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(prose(README.read_text()))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_every_tested_block_is_run_here():
    marked = [name for page in PAGES for name in re.findall(r"<!-- tested: ([\w-]+) -->", prose(page.read_text()))]
    assert sorted(marked) == sorted(TESTED), "each <!-- tested: NAME --> block once, and each in TESTED"


def block(name: str) -> tuple[str, str]:
    """The python block marked `<!-- tested: NAME -->` in README.md or docs/*.md, and its page."""
    for page in PAGES:
        m = re.search(rf"<!-- tested: {name} -->\s*```python\n(.*?)```", page.read_text(), re.S)
        if m:
            return m.group(1), str(page.relative_to(REPO))
    raise AssertionError(f"no python block marked <!-- tested: {name} --> in README.md or docs/*.md")


@pytest.mark.parametrize("name", TESTED)
def test_loading_a_model_in_python_runs_as_written(name, workdir):
    torch.manual_seed(0)
    hparams = {"widths": [16, 32, 64], "stem": 8}
    net = models.build("fmnet", hparams).eval()
    (workdir / "models").mkdir()
    checkpoint.save(workdir / "models/fmnet.pt", net, make_spec("fmnet", hparams), Stats(0.29, 0.35), bf16=False,
                    run_id=None)
    code, page = block(name)
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 4
    scope: dict = {}
    exec(compile(code, f"{page}:{name}", "exec"), scope)  # noqa: S102 - the documentation's own lines
    model = scope["model"]
    x = torch.randn(3, 1, 28, 28)
    assert not model.training
    torch.testing.assert_close(model(x), net(x))
