"""Shared fixtures: small synthetic IDX files and processed splits, made by the tests themselves."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import signal
import struct
from pathlib import Path

import pytest
import torch

from fmnist import cli
from fmnist.data.idx import IMAGE_MAGIC, LABEL_MAGIC
from reliability_helpers import make_repo

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def idx_bytes(tensor: torch.Tensor, magic: int) -> bytes:
    """Serialise a uint8 tensor as an IDX file."""
    return struct.pack(f">I{tensor.dim()}I", magic, *tensor.shape) + tensor.to(torch.uint8).numpy().tobytes()


def synthetic_images(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Learnable 28x28 images: each class lights up its own band of rows, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (len(labels), 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        x[i, 2 * c + 4: 2 * c + 7, 4:24] = 220
    return x


def write_raw(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = False, seed: int = 0) -> Path:
    """Four IDX files in Fashion-MNIST's names (balanced labels), optionally gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = synthetic_images(labels, seed)
        for kind, t, magic in (("images-idx3", images, IMAGE_MAGIC), ("labels-idx1", labels, LABEL_MAGIC)):
            data = idx_bytes(t, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    return write_raw(tmp_path / "raw")


@pytest.fixture
def processed_dir(tmp_path: Path, raw_dir: Path) -> Path:
    """data/processed/ built by the real preprocess stage from the synthetic raw files."""
    from fmnist import config
    from fmnist.commands import preprocess

    out = tmp_path / "processed"
    preprocess.run(config.load(REPO / "params.yaml"), raw=raw_dir, out=out)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch repository root: the stages write models/ and reports/ here, and the
    MLflow store is tmp_path/mlflow.db."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("FMNIST_SOURCE", raising=False)
    return tmp_path


@pytest.fixture
def repo(workdir: Path, processed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The scratch repository root with the repository's params.yaml and the synthetic processed data;
    runs go to the default experiment, fashion-mnist."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return make_repo(workdir, processed_dir)


@pytest.fixture
def restore_sigterm():
    """For tests that call cli.main, which installs its own SIGTERM handler."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


@pytest.fixture
def fmnist(capsys, restore_sigterm):
    """`fmnist ARGS` in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        rc = cli.main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def specs(*overrides: str, params: str | Path = "params.yaml") -> dict:
    """Every model's run spec from ``params`` with ``overrides`` (as `--set`)."""
    from fmnist import runspec

    return runspec.load(params, overrides)


@functools.cache
def repo_params():
    """The committed params.yaml, validated: the settings a test starts from (the code has no defaults)."""
    from fmnist import config

    return config.load(REPO / "params.yaml")


def train_config(**changes):
    """The committed params.yaml's shared `train:` section with ``changes``."""
    return dataclasses.replace(repo_params().train, **changes)


def make_spec(arch: str = "linear", hparams: dict | None = None, model: str | None = None, **train):
    """A run spec made directly (any architecture and hyperparameters, the committed params.yaml's
    shared settings with ``train`` changes), for tests of one piece."""
    from fmnist import runspec

    name = model or arch
    return runspec.RunSpec(model=name, arch=arch, hparams=dict(hparams or {}), seed=42, loss="ce", focal=None,
                           data=repo_params().data, train=train_config(**train), evaluate=repo_params().evaluate,
                           paths=runspec.RunPaths.of(name))
