"""Files in and out: every write goes to a temp file beside its target, then is renamed;
every torch file is read with ``weights_only=True``.

An interrupted stage (Ctrl-C, SIGKILL, a full disk) never leaves a half-written
file that DVC or a user would trust: the old file stays, or the new one is
complete. A torch file that would unpickle anything but tensors and plain values
(code, say) is refused before it runs, with a message naming what it would call.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from fmnist import FmnistError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the destination's folder; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale(*paths: str | Path) -> None:
    """Remove the temp files that a writer killed inside ``atomic_path`` (SIGKILL, power loss)
    left beside ``paths``. Call it only where no other process is writing those paths."""
    for path in map(Path, paths):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_csv(path: str | Path, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)


def torch_save(path: str | Path, obj: Any) -> None:
    """Saved through a file object: given a path, torch.save names the archive inside after the
    (random) temp file, so the same tensors would give other bytes each time and DVC would see a
    changed output (and re-run every stage downstream)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_figure(path: str | Path, fig: Any, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically as PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kwargs)


def torch_load(path: str | Path, error: type[FmnistError], fix: str) -> Any:
    """Read a torch file of ours safely. Any failure raises ``error`` naming the file: a refused
    object by its name, anything else (truncated, not a torch file) with ``fix``, what to do."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled code (refused, never run)
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:  # torch's own text advises weights_only=False: name the culprit
            unsafe = re.search(r"GLOBAL (\S+)", text)
            what = f"it would call {unsafe.group(1)}" if unsafe else "it holds objects other than tensors"
            raise error(f"{path}: refused: {what}, which could run code when loaded; our files hold only "
                        "tensors and plain values: use files whose origin you trust") from e
        raise error(f"{path}: unreadable ({type(e).__name__}: {text[:200]}); it may be truncated: {fix}") from e
