"""The memory allocator a process of this project runs with: tcmalloc, where the machine has it.

A training step on the CPU allocates and frees a tensor for every activation, gradient and optimizer
temporary; tcmalloc keeps freed blocks for reuse in caches of its own. Measured here, the conv nets'
training steps ran 1.04x (tinyvgg) to 1.62x (fashionnet) as fast with it (fashionnet 1.26x in a
second measurement the same day), and the weights came out bit for bit the same (`python -m
benchmarks.run --only allocator`, docs/benchmarks.md). PyTorch's own CPU launcher does the same
(`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`).

A process chooses its allocator before it starts, so ``use_tcmalloc`` starts it again, once, at its
first line, with ``LD_PRELOAD`` naming the library, and the same command line. On Linux only, and
only where the library is installed (Debian and Ubuntu: ``apt-get install libtcmalloc-minimal4``);
elsewhere the process goes on with the C library's malloc. ``FMNIST_MALLOC=system`` opts out, and a
process started with ``LD_PRELOAD`` already set keeps what it names (another allocator, say).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV = "FMNIST_MALLOC"  # tcmalloc (the default) | system
LIBRARY = "tcmalloc_minimal"  # the allocator alone, without tcmalloc's heap profiler


def preloaded() -> bool:
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def wanted() -> bool:
    choice = os.environ.get(ENV, "tcmalloc").strip().lower()
    if choice not in ("tcmalloc", "system"):
        raise SystemExit(f"{ENV}={choice!r}: allowed: tcmalloc (the default), system")
    return choice == "tcmalloc" and sys.platform == "linux"


def use_tcmalloc() -> None:
    """Start this process again under tcmalloc, unless ``LD_PRELOAD`` is set already (so this happens
    at most once: a library the loader cannot preload is skipped by it, and the variable stays), it is
    not wanted, or the machine lacks it. Call it first, before anything is imported or written."""
    if not wanted() or os.environ.get("LD_PRELOAD"):  # a bad FMNIST_MALLOC is an error either way
        return
    library = ctypes.util.find_library(LIBRARY)
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": library})
