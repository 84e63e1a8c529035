"""Bad input fails cleanly at the stage that meets it, untrusted files never run code, and every
file a stage writes is written atomically. (Interrupts: test_interrupt.py; tracking faults:
test_tracking_faults.py; params and raw-data checks themselves: test_config.py, test_data.py.)"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import make_spec
from fmnist import checkpoint, files
from fmnist.core import models
from fmnist.checkpoint import CheckpointError
from fmnist.data import DataError
from fmnist.data.loader import Stats, load_split
from reliability_helpers import REPO, make_repo, temp_files

SRC = REPO / "src" / "fmnist"


@pytest.fixture
def repo(workdir: Path, processed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository of its own inside the scratch folder, and the current directory, so that
    tree(repo) holds exactly what the commands may write."""
    root = make_repo(workdir / "repo", processed_dir)
    monkeypatch.chdir(root)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fmnist {command}: error: "), err
    return lines[0]


def save_untrained(path: Path, name: str = "linear") -> None:
    torch.manual_seed(0)
    checkpoint.save(path, models.build(name, {}), make_spec(name), Stats(0.3, 0.35), run_id=None, bf16=False)


# --------------------------------------------------------------------------- bad processed data

def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("file, damage", [
    ("train.pt", Path.unlink), ("train.pt", truncate), ("val.pt", truncate),
    ("stats.json", Path.unlink), ("stats.json", lambda p: p.write_text("{not json")),
])
def test_train_detects_damaged_processed_data(repo, fmnist, file, damage):
    damage(repo / "data/processed" / file)
    before = tree(repo)
    rc, _, err = fmnist("train", "linear", "--set", "train.epochs=1")
    assert rc == 1
    line = one_line(err, "train")
    assert f"data/processed/{file}" in line and "dvc repro" in line
    assert tree(repo) == before  # no model, no metrics, no MLflow store


@pytest.mark.parametrize("file, damage", [
    ("data/processed/test.pt", Path.unlink), ("data/processed/test.pt", truncate), ("models/linear.pt", truncate),
])
def test_evaluate_detects_a_damaged_test_split_or_model(repo, fmnist, file, damage):
    save_untrained(repo / "models/linear.pt")
    damage(repo / file)
    before = tree(repo)
    rc, _, err = fmnist("evaluate", "linear")
    assert rc == 1
    line = one_line(err, "evaluate")
    assert file in line and "dvc repro" in line
    assert tree(repo) == before


# --------------------------------------------------------------------------- bad params at the stage

@pytest.mark.parametrize("args, names", [
    (["train", "resnet"], ["model 'resnet'", "allowed: logistic, linear, mlp"]),
    (["train", "linear", "--set", "loss=foo"], ["loss:", "ce, focal"]),
    (["train", "linear", "--set", "train.lr=-0.1"], ["train.lr:", "> 0"]),
    (["train", "linear", "--set", "train.lr=0"], ["train.lr:", "> 0"]),
    (["train", "linear", "--set", "train.epochs=0"], ["train.epochs:", ">= 1"]),
    (["train", "linear", "--set", "loss=focal", "--set", "focal.gamma=-1"], ["focal.gamma:", ">= 0"]),
    (["train", "linear", "--set", "focal.alpha=[1, 2]"], ["focal.alpha:", "(10)"]),
    (["train", "linear", "--set", "data.val_fraction=1.5"], ["data.val_fraction:", "(0, 1)"]),
    (["train", "linear", "--set", "data.val_fraction=0"], ["data.val_fraction:", "(0, 1)"]),
    (["train", "linear", "--set", "train.lrr=0.1"], ["train.lrr", "allowed:", "lr"]),
    (["train", "linear", "--set", "+train.lrr=0.1"], ["train.lrr: unknown key", "allowed:", "lr"]),
    (["train", "linear", "--set", "train.batch_size=541"], ["train.batch_size: 541", "allowed: 1..540"]),
    (["train", "fmnet", "--set", "models.fmnet.train.batch_size=100000"],
     ["models.fmnet.train.batch_size: 100000", "allowed: 1..540"]),
    (["evaluate", "linear", "--set", "evaluate.batch_size=0"], ["evaluate.batch_size:", ">= 1"]),
    (["train", "linear", "--set", "recipe=nonsense"], ["recipe: must be one of project, published"]),
    (["train", "linear", "--nproc", "0"], ["--nproc 0: must be at least 1"]),
    (["train", "linear", "--nproc", "64"], ["--nproc 64: this machine has", "--force"]),
    (["train", "linear", "--backend", "nccl", "--nproc", "2", "--force"], ["--backend nccl: needs CUDA"]),
])
def test_bad_params_exit_2_in_one_line_and_write_nothing(repo, fmnist, args, names):
    save_untrained(repo / "models/linear.pt")  # so that evaluate would have something to score
    before = tree(repo)
    rc, _, err = fmnist(*args)
    assert rc == 2
    line = one_line(err, args[0])
    for part in names:
        assert part in line
    assert tree(repo) == before  # no model, no reports, no MLflow store or run


def test_typo_in_params_file(repo, fmnist):
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("  lr: ", "  lrate: "))
    before = tree(repo)
    rc, _, err = fmnist("train", "linear")
    assert rc == 2
    line = one_line(err, "train")
    assert "train.lrate: unknown key; allowed:" in line and " lr," in line
    assert tree(repo) == before


# --------------------------------------------------------------------------- untrusted files

class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path, kind: str) -> Path:
    obj = {"format": checkpoint.FORMAT, "state_dict": {}, "arch": "linear", "hparams": {}, "x": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "evil.pt", marker, kind)
    # Control: the file really runs code when unpickled without the guard.
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "refused" in msg and "posix.system" in msg
    assert "weights_only" not in msg  # never the advice to turn the guard off


def test_crafted_files_refused_by_the_stages(repo, fmnist):
    marker = repo.parent / "pwned"
    crafted(repo / "models/linear.pt", marker, "zip")
    before = tree(repo)
    rc, _, err = fmnist("evaluate", "linear")
    assert rc == 1
    assert "models/linear.pt: refused" in one_line(err, "evaluate")
    assert not marker.exists() and tree(repo) == before

    crafted(repo / ".fmnist/resume/linear.pt", marker, "zip")
    before = tree(repo)
    rc, _, err = fmnist("train", "linear", "--resume")
    assert rc == 1
    assert ".fmnist/resume/linear.pt: refused" in one_line(err, "train")
    assert not marker.exists() and tree(repo) == before

    crafted(repo / "data/processed/train.pt", marker, "zip")
    with pytest.raises(DataError, match=r"train\.pt: refused: it would call posix\.system"):
        load_split("train", repo / "data/processed")
    assert not marker.exists()


def test_every_torch_load_uses_weights_only():
    calls = [(f, c) for f, c in _calls(SRC) if _name(c.func) == "torch.load"]
    assert calls, "expected torch.load calls to check"
    for f, c in calls:
        kw = {k.arg: k.value for k in c.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{f}:{c.lineno}: torch.load without weights_only=True"


# --------------------------------------------------------------------------- atomic outputs

# Writes that are not outputs, each with its reason.
NOT_OUTPUTS = {
    ("store.py", "open"): "the SQLite store's lock file: holds no data",
    ("params.py", "copy.write_text"): "a scratch copy of params.yaml in a temporary folder, for DVC's override parser",
}
WRITERS = {"np.save", "numpy.save", "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree",
           "shutil.move", "os.rename", "os.replace", "os.link", "os.symlink"}


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        base = _name(func.value)
        return f"{base}.{func.attr}" if base else func.attr
    return ""


def _calls(root: Path):
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call):
                yield f, node


def _writes(call: ast.Call) -> str | None:
    """What a call writes, if it writes a file outside fmnist.files."""
    name = _name(call.func)
    if name in ("open", "io.open", "gzip.open") or name.endswith(".open"):
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        if mode is None:
            return None  # read
        if not isinstance(mode, ast.Constant):
            return name  # cannot tell: treat as a write
        return name if set(str(mode.value)) & set("wax+") else None
    if name in WRITERS:
        return name
    if not isinstance(call.func, ast.Attribute) or name.startswith("files.") or name == "checkpoint.save":
        return None  # write_json(...) and friends imported from fmnist.files
    short = name.rsplit(".", 1)[-1]  # p.write_text, fig.savefig, torch.save, PIL's im.save, ...
    return name if short in {"write_text", "write_bytes", "savefig", "to_csv", "touch", "save"} else None


def test_every_written_file_goes_through_atomic():
    offenders, allowed_seen = [], set()
    for f, call in _calls(SRC):
        if f.name == "files.py" or (what := _writes(call)) is None:
            continue
        key = (f.name, what)
        if key in NOT_OUTPUTS:
            allowed_seen.add(key)
            continue
        offenders.append(f"{f.relative_to(SRC)}:{call.lineno}: {what}(...) writes outside fmnist.files")
    assert offenders == []
    assert allowed_seen == set(NOT_OUTPUTS), "an allowance no longer needed: remove it"


def test_the_scan_sees_writes():
    """The scan above is only as good as _writes: it must flag each way of writing a file."""
    def writes(code: str) -> str | None:
        return _writes(ast.parse(code).body[0].value)

    flagged = [writes(code) for code in (
        "open(p, 'w')", "open(p, mode='ab')", "open(p, 'r+')", "p.write_text(s)", "p.write_bytes(b)",
        "torch.save(x, p)", "fig.savefig(p)", "shutil.copy(a, b)", "os.replace(a, b)", "gzip.open(p, 'wb')",
        "open(p, m)", "im.save(p)", "Path(p).touch()")]
    assert all(flagged), flagged
    not_flagged = ["open(p)", "open(p, 'rb')", "p.read_text()", "write_json(p, x)", "checkpoint.save(p, m)"]
    assert [writes(code) for code in not_flagged] == [None] * len(not_flagged)


def test_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    files.write_json(path, {"accuracy": 0.9})
    old = path.read_bytes()

    with pytest.raises(RuntimeError), files.atomic_open(path) as f:
        f.write('{"accuracy": 0.')
        raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt), files.atomic_open(path) as f:
        f.write("{")
        raise KeyboardInterrupt
    with pytest.raises(TypeError):
        files.write_json(path, {"accuracy": object()})  # fails half-way through json.dump
    with pytest.raises(Exception):
        files.torch_save(path, {"f": lambda: 0})  # cannot be pickled

    assert path.read_bytes() == old
    assert temp_files(tmp_path) == []
    new = tmp_path / "out" / "new.csv"
    with pytest.raises(RuntimeError), files.atomic_open(new) as f:
        f.write("a,b\n")
        raise RuntimeError
    assert not new.exists() and temp_files(tmp_path) == []


def test_atomic_write_is_complete_and_readable(tmp_path):
    path = tmp_path / "a" / "history.csv"
    files.write_csv(path, [{"epoch": 1, "loss": 0.5}])
    files.write_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}])
    assert path.read_text().splitlines() == ["epoch,loss", "1,0.5", "2,0.4"]
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    assert temp_files(tmp_path) == []


def test_same_inputs_give_byte_identical_outputs(tmp_path, raw_dir):
    """DVC compares outputs by hash: a re-run with the same inputs must not look like a change."""
    from fmnist import config
    from fmnist.commands import preprocess

    params = config.load(REPO / "params.yaml")
    preprocess.run(params, raw=raw_dir, out=tmp_path / "a")
    preprocess.run(params, raw=raw_dir, out=tmp_path / "b")
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    save_untrained(tmp_path / "m1.pt")
    save_untrained(tmp_path / "m2.pt")
    assert (tmp_path / "m1.pt").read_bytes() == (tmp_path / "m2.pt").read_bytes()
