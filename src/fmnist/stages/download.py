"""download: the four official IDX files into data/raw/, verified."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from fmnist.atomic import atomic_path
from fmnist.data import RAW_DIR, DataError
from fmnist.data import sources as src

log = logging.getLogger(__name__)


def run(source: str | None = None, out: str | Path = RAW_DIR, progress: bool = True) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = src.sources(source)
    # Stage every file first; only when all four are verified do they replace data/raw/.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=out.parent))
    try:
        for f in src.FILES:
            existing = out / f.name
            if existing.is_file() and existing.stat().st_size == f.size:
                try:
                    src.verify(existing.read_bytes(), f, str(existing))
                    log.info("%s: already present and verified", existing)
                    continue
                except DataError:
                    pass
            (staging / f.name).write_bytes(_fetch_first(candidates, f, progress))
        written = []
        for f in src.FILES:
            staged = staging / f.name
            if staged.exists():
                with atomic_path(out / f.name) as tmp:
                    shutil.move(staged, tmp)
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_first(candidates: list[src.Source], f: src.RawFile, progress: bool) -> bytes:
    problems = []
    for source in list(candidates):
        try:
            data = src.fetch(source, f, progress=progress)
            log.info("%s: verified from %s", f.name, source)
            return data
        except DataError as e:
            if source.kind == "given":
                raise
            problems.append(f"  - {source}: {e}")
            log.warning("%s: %s; trying the next source", f.name, e)
        except OSError as e:
            if source.kind == "given":
                raise DataError(f"{f.name}: cannot read it from {source.location}: {e}") from None
            problems.append(f"  - {source}: {e}")
            if source.is_url and not isinstance(e, FileNotFoundError):
                candidates.remove(source)  # unreachable: don't wait on it again for the other files
    tried = "\n".join(problems) or "  (none)"
    raise DataError(f"{f.name}: no source could provide it. Tried:\n{tried}\n{src.HOW_TO_PROVIDE}")
