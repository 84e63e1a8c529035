"""fmnist.allocator: a process starts again, once, under tcmalloc where the machine has it; opting
out, or an LD_PRELOAD already set, leaves it as it started."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from fmnist import allocator

# The process reports whether tcmalloc is mapped into it, and its LD_PRELOAD.
CODE = ("import os, sys; from fmnist import allocator; allocator.use_tcmalloc(); "
        "print('tcmalloc' in open('/proc/self/maps').read(), repr(os.environ.get('LD_PRELOAD', '')), sys.argv[1:])")
needs_tcmalloc = pytest.mark.skipif(sys.platform != "linux" or ctypes.util.find_library(allocator.LIBRARY) is None,
                                    reason="no libtcmalloc_minimal (apt-get install libtcmalloc-minimal4)")


def _run(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    done = subprocess.run([sys.executable, "-c", CODE, "an-argument"], env={**base, **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(maxsplit=2)


@needs_tcmalloc
def test_the_process_starts_again_under_tcmalloc_with_its_arguments():
    mapped, preload, argv = _run()
    assert mapped == "True" and "tcmalloc_minimal" in preload
    assert argv.strip() == "['an-argument']"


@needs_tcmalloc
def test_opting_out_or_a_preload_already_set_keeps_the_process_as_it_started():
    assert _run(FMNIST_MALLOC="system")[:2] == ["False", "''"]
    jemalloc = ctypes.util.find_library("jemalloc")
    if jemalloc:  # another allocator the user chose is not joined by tcmalloc
        mapped, preload, _ = _run(LD_PRELOAD=jemalloc)
        assert mapped == "False" and preload == repr(jemalloc)


def test_an_unknown_choice_is_an_error_naming_the_allowed_ones():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, allocator.ENV: "mimalloc"})
    assert done.returncode == 1 and "FMNIST_MALLOC='mimalloc': allowed: tcmalloc (the default), system" in done.stderr
