"""Where the four official IDX files come from, and how each is verified.

Sources, in order: a path or URL the user gives (``--source`` or
``FMNIST_SOURCE``); a local copy already on the machine; the official mirrors.
Whatever the source, a file is accepted only if its *decompressed* content
matches the pinned SHA-256, so a re-gzipped copy verifies and a corrupt one
never reaches preprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from fmnist.data import DataError


@dataclass(frozen=True)
class RawFile:
    name: str  # decompressed file name, as written to data/raw/
    sha256: str  # of the decompressed content
    size: int  # decompressed bytes


# The official files' decompressed content (the label files checked byte for byte
# against the official repository; Debian's copy has normalised gzip headers only).
FILES = (
    RawFile("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    RawFile("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    RawFile("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    RawFile("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
)

LOCAL_COPIES = (
    "/usr/share/datasets/fashion-mnist",  # Debian: apt-get install dataset-fashion-mnist
    "~/.cache/torchvision/FashionMNIST/raw",  # torchvision's usual layout: <root>/FashionMNIST/raw
    "~/data/FashionMNIST/raw",
    "./data/FashionMNIST/raw",
)

MIRRORS = (
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    # torchvision's mirror; plain HTTP, which the pinned SHA-256 makes safe to use.
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

HOW_TO_PROVIDE = (
    "Provide the four Fashion-MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in one of these ways:\n"
    "  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
    "  - put them in a folder and run: FMNIST_SOURCE=/path/to/folder dvc repro\n"
    "    (or: fmnist download --source /path/to/folder; a base URL works too)\n"
    "  - or allow HTTPS access to " + MIRRORS[0]
)

MAX_COMPRESSED = 64 * 2**20  # no official file is larger; refuse anything bigger


@dataclass(frozen=True)
class Source:
    kind: str  # "given", "local" or "mirror"
    location: str  # a folder or a base URL

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://", "file://"))

    def __str__(self) -> str:
        return f"{self.kind} source {self.location}"


def candidates(given: str | None = None) -> list[Source]:
    """The sources to try, in order. A source the user names is the only one tried:
    if it is wrong, the user must hear so rather than silently get other bytes."""
    given = given or os.environ.get("FMNIST_SOURCE") or None
    if given:
        return [Source("given", given)]
    local = [Source("local", str(Path(p).expanduser())) for p in LOCAL_COPIES]
    return [s for s in local if Path(s.location).is_dir()] + [Source("mirror", m) for m in MIRRORS]


def fetch(source: Source, f: RawFile, timeout: float = 30.0, retries: int = 3, progress: bool = True) -> bytes:
    """Return the verified, decompressed content of ``f`` from ``source``.

    Raises DataError naming the file and what is wrong with it; FileNotFoundError
    or OSError when the source simply does not have it or cannot be reached.
    """
    if source.is_url:
        blob = _download(source.location.rstrip("/") + "/" + f.name + ".gz", timeout, retries, progress)
        where = source.location
    else:
        folder = Path(source.location).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        path = next((p for p in (folder / (f.name + ".gz"), folder / f.name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: has neither {f.name}.gz nor {f.name}")
        if path.stat().st_size > MAX_COMPRESSED:
            raise DataError(f"{path}: {path.stat().st_size} bytes, larger than any Fashion-MNIST file")
        blob = path.read_bytes()
        where = str(path)
    return verify(blob, f, where)


def verify(blob: bytes, f: RawFile, where: str) -> bytes:
    """Decompress if gzipped (bounded by the expected size) and check the SHA-256."""
    if blob[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(blob)) as gz:
                data = gz.read(f.size + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{f.name} (from {where}): corrupt gzip data ({e}); "
                            "the file is truncated or damaged, fetch it again") from e
    else:
        data = blob
    if len(data) != f.size:
        raise DataError(f"{f.name} (from {where}): size mismatch, {len(data)} bytes "
                        f"after decompression, expected {f.size}; the file is truncated or not Fashion-MNIST")
    digest = hashlib.sha256(data).hexdigest()
    if digest != f.sha256:
        raise DataError(f"{f.name} (from {where}): SHA-256 mismatch, got {digest}, expected {f.sha256}; "
                        "the file is corrupt or not the official Fashion-MNIST file")
    return data


def _download(url: str, timeout: float, retries: int, progress: bool) -> bytes:
    from tqdm import tqdm

    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "fmnist"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                if total and total > MAX_COMPRESSED:
                    raise DataError(f"{url}: {total} bytes, larger than any Fashion-MNIST file")
                buf = bytearray()
                with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                          disable=not progress, leave=False) as bar:
                    while chunk := resp.read(1 << 16):
                        buf += chunk
                        bar.update(len(chunk))
                        if len(buf) > MAX_COMPRESSED:
                            raise DataError(f"{url}: larger than any Fashion-MNIST file")
                return bytes(buf)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{url}: 404 Not Found") from e
            last = e
        except OSError as e:  # URLError, timeouts, refused connections
            last = e
        if attempt < retries:
            time.sleep(min(2.0 ** attempt, 10.0) * 0.5)
    raise OSError(f"{url}: unreachable after {retries} tries ({last})")
