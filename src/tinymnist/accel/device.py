"""Device choice and seeding, kept in one place."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from . import runtime
from ..errors import TinyMnistError

# the choices of a recipe's precision and memory_format fields; "auto" resolves per machine
PRECISIONS = ("fp32", "bf16", "auto")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """Return the requested device, or the best available one for 'auto'."""
    if name not in DEVICES:
        raise TinyMnistError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TinyMnistError("device 'cuda' requested but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TinyMnistError("device 'mps' requested but MPS is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_threads(threads: int = 0) -> int:
    """Use `threads` intra-op threads (0 = one per available core); return the count in use."""
    if threads <= 0:
        threads = available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def sync(device: torch.device) -> None:
    """Wait for queued device work; only for timing."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------- what the machine is

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # the ones that decide speed here


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """CPU model name and the relevant ISA flags, read from the machine (Linux), else what Python and torch say."""
    name, flags = None, set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    import platform

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"cpu_model": name or platform.processor() or platform.machine(), "cores": available_cores(),
            "isa": {f: f in flags for f in ISA_FLAGS} if flags else None, "torch_cpu_capability": capability}


def hardware(device: torch.device) -> dict:
    """The hardware facts recorded with every result: the CPU always, and the GPU when one trains."""
    facts = cpu_info()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts.update(gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")
    facts.update(runtime.state())  # the OpenMP wait policy and the heap policy in force
    return facts


def native_bf16(device: torch.device, facts: dict) -> bool:
    """bf16 the hardware computes natively: AMX or AVX-512 BF16 on a CPU, compute capability >= 8.0 on CUDA."""
    if device.type == "cuda":
        return tuple(int(v) for v in facts.get("compute_capability", "0.0").split(".")) >= (8, 0)
    if device.type == "cpu":
        isa = facts.get("isa") or {}
        return bool(isa.get("amx_bf16") or isa.get("avx512_bf16"))
    return False




def resolve_precision(requested: str, device: torch.device, facts: dict, warn=None) -> str:
    """'auto' -> bf16 only where the hardware has it natively, else fp32. An explicit bf16 without native
    support still runs, after a one-line warning: it is emulated, and many times slower than fp32."""
    if requested not in PRECISIONS:
        raise TinyMnistError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    native = native_bf16(device, facts)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native and warn is not None:
        where = facts.get("gpu") or facts.get("cpu_model") or device.type
        warn(f"tinymnist: warning: bf16 on {where}, which has no native bf16 (AMX, AVX-512 BF16 or CUDA "
             "compute capability 8.0+): it is emulated and runs many times slower than fp32")
    return requested




def resolve_memory_format(requested: str, device: torch.device, facts: dict) -> str:
    """'auto' -> channels_last on an x86 CPU with AVX2 or better (oneDNN's NHWC convolutions: +24-30% for
    Model_7's training step on a 2-core AVX2 host, at 1 and 2 threads; bench's lean/plain re-measures it on
    every host), contiguous elsewhere. A fixed rule, not a timing at start-up, so the same run on the same
    machine always trains in the same format and gives the same history."""
    if requested not in MEMORY_FORMATS:
        raise TinyMnistError(f"unknown memory format {requested!r} (choose from {', '.join(MEMORY_FORMATS)})")
    if requested != "auto":
        return requested
    isa = facts.get("isa") or {}
    return "channels_last" if device.type == "cpu" and isa.get("avx2") else "contiguous"


def torch_memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed-precision context: bf16 runs convolutions in bfloat16 (fast with AMX on CPU, or on recent GPUs);
    weights, optimizer state and the loss stay float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise TinyMnistError(f"unresolved precision {precision!r}: resolve 'auto' before training")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
