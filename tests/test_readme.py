"""The README's code that users copy runs as written: the Python blocks marked
`<!-- tested: NAME -->` are run here, exactly as they stand."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import REPO, make_spec
from fmnist import checkpoint
from fmnist.core import models
from fmnist.data.loader import Stats

README = (REPO / "README.md").read_text()


def block(name: str) -> str:
    m = re.search(rf"<!-- tested: {name} -->\s*```python\n(.*?)```", README, re.S)
    assert m, f"README.md has no python block marked <!-- tested: {name} -->"
    return m.group(1)


@pytest.mark.parametrize("name", ["load-with-fmnist", "load-with-torch"])
def test_loading_a_model_in_python_runs_as_written(name, workdir):
    torch.manual_seed(0)
    hparams = {"widths": [16, 32, 64], "stem": 8}
    net = models.build("fmnet", hparams).eval()
    (workdir / "models").mkdir()
    checkpoint.save(workdir / "models/fmnet.pt", net, make_spec("fmnet", hparams), Stats(0.29, 0.35), bf16=False,
                    run_id=None)
    code = block(name)
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 4
    scope: dict = {}
    exec(compile(code, f"README.md:{name}", "exec"), scope)  # noqa: S102 - the README's own lines
    model = scope["model"]
    x = torch.randn(3, 1, 28, 28)
    assert not model.training
    torch.testing.assert_close(model(x), net(x))
