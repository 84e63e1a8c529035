"""Where a model runs and in what precision: CUDA when there is one (``device: auto``), and bf16
autocast only where the hardware computes bf16 natively and the model gains from it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from fmnist import ConfigError
from fmnist.core.models import worth_bf16


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: is cuda but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    bf16: bool  # train and evaluate under bf16 autocast


def place(device: str, precision: str, model: nn.Module, local_rank: int | None = None) -> Placement:
    """Where ``model`` trains and in what precision, chosen once per run from ``train.device`` and
    ``train.precision``; under torchrun on GPUs, each process takes the GPU of its ``local_rank``.
    Fails before any work when the params ask for what this machine lacks."""
    chosen = select_device(device)
    if chosen.type == "cuda" and local_rank is not None:
        chosen = torch.device("cuda", local_rank)
    return Placement(chosen, use_bf16(precision, chosen, model))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX or AVX-512 BF16). Elsewhere
    bf16 is emulated and slower than fp32, so ``precision: auto`` stays in fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except (RuntimeError, AttributeError):  # a probe some builds lack
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    except OSError:
        return False


def use_bf16(precision: str, device: torch.device, model: nn.Module | None = None) -> bool:
    """``auto`` means bf16 where the hardware has it and, given ``model``, where it pays."""
    if precision == "fp32":
        return False
    supported = (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16())
    if precision == "bf16" and not supported:
        raise ConfigError(f"train.precision: is bf16 but this {device.type.upper()} has no native bf16; "
                           "use auto or fp32")
    if precision == "auto" and model is not None and not worth_bf16(model):
        return False
    return supported


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
