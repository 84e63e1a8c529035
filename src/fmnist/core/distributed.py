"""Data-parallel training over several processes, as torch.distributed's launcher (torchrun) runs it.

A worker knows its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). Every
rank draws the same shuffled order from the seed and trains on its own slice of every global batch,
so N processes with global batch B take the optimiser steps one process takes with batch B.
Metrics are sums all-reduced over the ranks, so every rank sees the same numbers and stops at the
same epoch. Only rank 0 writes files, prints and logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as torch_dist

from fmnist import ConfigError, FmnistError
from fmnist.core.device import select_device


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's part of ``n`` items: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over every rank (float64 where exactness matters), on every rank."""
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t


def launched() -> bool:
    """True inside a worker started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device, backend: str = "auto") -> str:
    """gloo on the CPU, nccl on CUDA, unless asked otherwise; nccl without CUDA is refused."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl: needs CUDA GPUs, and none is available; use gloo (the CPU's)")
    return ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend


class WorkerFailed(FmnistError):
    """A process of a distributed training failed; the others were stopped."""


def launch(nproc: int, argv: list[str], device: str = "auto", *, force: bool = False, backend: str = "auto") -> None:
    """Run ``python -m fmnist ARGV`` as ``nproc`` processes on this machine with torch.distributed's
    launcher (torchrun); each process finds its place with ``joined``. A failed worker stops the
    others, and the error names the rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    chosen = select_device(device)
    backend_for(chosen, backend)
    devices, kind = (torch.cuda.device_count(), "GPUs") if chosen.type == "cuda" else (os.cpu_count(), "CPU cores")
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if nproc > (devices or 1) and not force:
        raise ConfigError(f"--nproc {nproc}: this machine has {devices} {kind}; more processes than that compete "
                          "for them (add --force to run anyway)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "--module", "fmnist", *argv])
    except ChildFailedError as e:
        first = e.get_first_failure()[1]
        how = (f"killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exit status {first.exitcode}")
        raise WorkerFailed(f"rank {first.local_rank} of {nproc} failed ({how}); the others were stopped and "
                           "nothing was written") from e


@contextlib.contextmanager
def joined(device: str = "auto", backend: str = "auto") -> Iterator[Group | None]:
    """Inside a torchrun worker: the process group, joined on entry and left on exit (ranks other
    than 0 log warnings only). Alone: None."""
    group = start(select_device(device), backend)
    if group is not None and not group.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield group
    finally:
        stop(group)


def start(device: torch.device, backend: str = "auto") -> Group | None:
    """Join the process group torchrun prepared; None when alone."""
    if not launched():
        return None
    backend = backend_for(device, backend)
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)  # one GPU per process
    else:  # the cores shared out between the processes of this node, none oversubscribed
        local = int(os.environ.get("LOCAL_WORLD_SIZE", group.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    torch_dist.init_process_group(backend)
    return group


def stop(group: Group | None) -> None:
    if group is not None and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
