"""Device choice and seeding, kept in one place."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .errors import TinyMnistError

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


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed-precision context: bf16 runs convolutions in bfloat16 (fast with AMX on CPU, or on recent GPUs);
    weights, optimizer state and the loss stay float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise TinyMnistError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
