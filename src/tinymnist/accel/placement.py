"""A network placed on this machine, in one call: the recipe's "auto" precision, memory format and kernels resolved
for this device (the rules of device.py and kernels.py), the network moved to the device in its memory format, and
trained on the C kernels as programs where they apply. The whole part the speed layer plays when a recipe is
resolved (core/plan.py); it takes plain values, so it knows nothing of the config."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import first_line
from .device import resolve_memory_format, resolve_precision, torch_memory_format
from .kernels import coverage, resolve_kernels, use_kernels
from .program import swap_sequentials


@dataclass(frozen=True)
class Placement:
    """What this machine gives a network: the resolved precision, memory format and kernels, and `kernels_applied`,
    what of the network trains in C (kernels.coverage; empty when the kernels are PyTorch's)."""

    precision: str
    memory_format: str
    kernels: str
    kernels_applied: dict


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve(precision: str, memory_format: str, kernels: str, device: torch.device, facts: dict,
            warn: bool = True, user_model: Optional[nn.Module] = None) -> tuple[str, str, str]:
    """(precision, memory format, kernels) with "auto" replaced by what this machine gets; an explicit bf16 without
    native support, or fused kernels that do not build here, is one line on stderr (`warn`). `user_model`: a
    user's network, whose "auto" memory format is channels_last only if one training step runs in it."""
    say: Optional[Callable[[str], None]] = _stderr if warn else None
    precision_ = resolve_precision(precision, device, facts, warn=say)
    fmt = resolve_memory_format(memory_format, device, facts)
    if memory_format == "auto" and fmt == "channels_last" and user_model is not None:
        fmt = _channels_last_trains(user_model, device, say)
    kernels_ = resolve_kernels(kernels, device, precision_, fmt, note=say)
    threads = torch.get_num_threads()
    if say is not None and kernels_ == "native" and device.type == "cpu" and threads > 1:
        # the C kernels sum over fixed slices of the batch; PyTorch's batch norm and convolutions split their sums
        # by thread, so only on them does a run's history depend on its thread count
        say(f"tinymnist: note: this run trains on PyTorch's own batch norm and convolutions (kernels native), whose "
            f"sums depend on the thread count: its history is the one of {threads} threads, not of another count")
    return precision_, fmt, kernels_


def apply(model: nn.Module, device: torch.device, memory_format: str, kernels: str) -> nn.Module:
    """`model` on `device`, in a resolved memory format, with resolved kernels: on "fused", its convolutions, batch
    norms + activations and pools swapped for the C kernels' and each chain of them trained as one program (the
    same results, fewer calls). In place; returns the model."""
    model = model.to(device, memory_format=torch_memory_format(memory_format))
    if kernels == "fused":
        use_kernels(model)
        swap_sequentials(model)
    return model


def place(model: nn.Module, device: torch.device, facts: dict, precision: str, memory_format: str, kernels: str,
          user: bool = False, warn: bool = True) -> tuple[nn.Module, Placement]:
    """resolve, then apply: the network on this machine, and what it was given."""
    precision, memory_format, kernels = resolve(precision, memory_format, kernels, device, facts, warn,
                                                user_model=model if user else None)
    model = apply(model, device, memory_format, kernels)
    return model, Placement(precision, memory_format, kernels, coverage(model) if kernels == "fused" else {})


def _channels_last_trains(model: nn.Module, device: torch.device, say) -> str:
    """A user's network may reshape with .view, which channels_last activations do not allow: one training step of
    a copy, on a small random batch, says whether it trains in channels_last; if not, it trains contiguous (one
    line says so). The probe draws from its own RNG state and trains a copy, so the run's history does not depend
    on it."""
    with torch.random.fork_rng(devices=[]):
        try:
            probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last).train()
            x = torch.randn(4, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
            F.cross_entropy(probe(x), torch.zeros(4, dtype=torch.long, device=device)).backward()
            return "channels_last"
        except RuntimeError as e:
            if say is not None:
                say(f"tinymnist: note: {type(model).__name__} does not train in channels_last memory ("
                    f"{first_line(e)[:120]}); training it contiguous")
            return "contiguous"
