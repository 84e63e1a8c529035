"""The page `dvc plots show` writes (dvc_plots/index.html), drawn without internet.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine offline
(CI, an air-gapped cluster) it stays blank. This folder holds the three minified builds
from npm, each with its package's LICENSE beside it, and template.html: DVC's page with
those builds inlined, so the written page needs neither the network nor any other file
(it still draws when dvc_plots/ is copied elsewhere or `dvc plots show -o` writes it
anywhere). `.dvc/config` points DVC at it: `dvc config plots.html_template plots/html/template.html`.

DVC fills a template by replacing `{plot_divs}`, `{refresh_tag}` and `{scripts}` wherever
they occur, so a build may contain none of them, nor `</script` or `<!--`, which would end
or garble its inline script; page() refuses such a build. The template has no `{scripts}`:
that is where DVC would put its CDN tags (vega's, or plotly's, which this project does not use).

    python .dvc/plots/html/vendor.py           # template.html again from the .min.js files here
    python .dvc/plots/html/vendor.py --fetch   # first each of PACKAGES from npm (needs npm)

To update, change the versions in PACKAGES and run it with --fetch. tests/test_plots_offline.py
checks that template.html is what page() makes, and that the page draws in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "template.html"

# (npm package, version, its minified browser build); loaded in this order: vega-lite and
# vega-embed need the globals `vega` (and `vegaLite`) that the ones before them define.
PACKAGES = [
    ("vega", "5.33.1", "build/vega.min.js"),
    ("vega-lite", "5.23.0", "build/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "build/vega-embed.min.js"),
]

FORBIDDEN = ("{plot_divs}", "{refresh_tag}", "{scripts}", "</script", "<!--")

HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template: DVC's default page, with each build inlined instead of a CDN link."""
    parts = [HEAD]
    for name, version, _ in PACKAGES:
        js = (HERE / f"{name}.min.js").read_text(encoding="utf-8")
        bad = [s for s in FORBIDDEN if s in js.lower()]
        if bad:
            raise SystemExit(f"{name}.min.js contains {', '.join(bad)}: it cannot be inlined in "
                             f"template.html (DVC would replace it, or it would end the script)")
        parts.append(f"    <!-- {name} {version}, BSD-3-Clause: .dvc/plots/html/{name}.LICENSE -->\n"
                     f"    <script>\n{js.rstrip()}\n    </script>\n")
    parts.append(TAIL)
    return "".join(parts)


def fetch() -> None:
    """`npm pack` each of PACKAGES (npm checks the tarball's integrity); copy its build and LICENSE here."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, build in PACKAGES:
            out = subprocess.run(["npm", "pack", "--json", f"{name}@{version}"], cwd=tmp,
                                 check=True, capture_output=True, text=True).stdout
            with tarfile.open(Path(tmp) / json.loads(out)[0]["filename"]) as tar:
                members = {m.name.removeprefix("package/"): m for m in tar.getmembers()}
                (HERE / f"{name}.min.js").write_bytes(tar.extractfile(members[build]).read())
                if "LICENSE" in members:
                    (HERE / f"{name}.LICENSE").write_bytes(tar.extractfile(members["LICENSE"]).read())
                elif not (HERE / f"{name}.LICENSE").is_file():
                    raise SystemExit(f"{name}@{version} has no LICENSE on npm: copy the one of "
                                     f"github.com/vega/{name} at tag v{version} to {HERE / name}.LICENSE")
                else:  # vega's npm package ships none: its LICENSE is the repository's, at tag v<version>
                    print(f"{name}@{version} has no LICENSE on npm: kept {name}.LICENSE; check it against "
                          f"the LICENSE of github.com/vega/{name} at tag v{version}", file=sys.stderr)
            print(f"{name}@{version}: {name}.min.js")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="first fetch PACKAGES from npm")
    if parser.parse_args().fetch:
        fetch()
    TEMPLATE.write_text(page(), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
