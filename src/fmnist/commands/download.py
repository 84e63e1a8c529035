"""download: the four official IDX files into data/raw/, verified."""

from __future__ import annotations

import logging
from pathlib import Path

from fmnist.data import RAW_DIR, DataError, sources
from fmnist.files import atomic_open

log = logging.getLogger(__name__)


def run(source: str | None = None, out: str | Path = RAW_DIR, progress: bool = True) -> list[Path]:
    out = Path(out)
    candidates = sources.candidates(source)
    given = any(c.kind == "given" for c in candidates)
    # Fetch and verify every missing file first (55 MB at most, held in memory); only when all
    # four are good do they replace data/raw/, each one atomically. A source the user names is
    # always checked, so a wrong one is reported even when data/raw/ is already complete.
    fetched: dict[str, bytes] = {}
    for f in sources.FILES:
        existing = out / f.name
        present = existing.is_file() and existing.stat().st_size == f.size and _verified(existing, f)
        if present and not given:
            log.info("%s: already present and verified", existing)
            continue
        data = _fetch_first(candidates, f, progress)
        if not present:  # a verified file already there holds these very bytes: leave it untouched
            fetched[f.name] = data
    for name, data in fetched.items():
        with atomic_open(out / name, "wb") as fh:
            fh.write(data)
    return [out / f.name for f in sources.FILES]


def _verified(path: Path, f: sources.RawFile) -> bool:
    try:
        sources.verify(path.read_bytes(), f, str(path))
        return True
    except DataError:
        return False


def _fetch_first(candidates: list[sources.Source], f: sources.RawFile, progress: bool) -> bytes:
    problems = []
    for source in list(candidates):
        try:
            data = sources.fetch(source, f, progress=progress)
            log.info("%s: verified from %s", f.name, source)
            return data
        except DataError as e:
            if source.kind == "given":
                raise
            problems.append(f"  - {source}: {e}")
            log.warning("%s: %s; trying the next source", f.name, e)
        except OSError as e:
            if source.kind == "given":
                raise DataError(f"{f.name}: cannot read it from {source.location}: {e}") from e
            problems.append(f"  - {source}: {e}")
            if source.is_url and not isinstance(e, FileNotFoundError):
                candidates.remove(source)  # unreachable: don't wait on it again for the other files
    tried = "\n".join(problems) or "  (none)"
    raise DataError(f"{f.name}: no source could provide it. Tried:\n{tried}\n{sources.HOW_TO_PROVIDE}")
