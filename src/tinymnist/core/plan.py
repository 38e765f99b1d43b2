"""A recipe resolved once: the recipe, the data on its device and a teacher become a plan (the filled-in recipe, what
this machine gives it, the built network, the held-out split and its fingerprint), which the trainer trains and
the run directory writes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..accel.device import hardware, resolve_memory_format, resolve_precision, seed_everything, torch_memory_format
from ..accel.kernels import coverage, resolve_kernels, use_kernels
from ..accel.program import swap_sequentials
from ..errors import TinyMnistError, first_line
from ..models.model import Net, count_params, model_class
from ..models.userfile import check_forward, file_sha256
from .config import TrainConfig
from .data import MNIST, VAL_SEED, split_fingerprint, validation_split


@dataclass(frozen=True)
class Split:
    """The held-out images of a validation run: indices into the training images, on the device, and what a run
    records of them (size, seed, stratified, fingerprint)."""

    keep: torch.Tensor
    held: torch.Tensor
    record: dict


@dataclass(frozen=True)
class Plan:
    """What a run trains, resolved once: `cfg` is the recipe as the run records it (dropout filled in, "auto"
    precision, memory format and kernels resolved for this machine), `model` the untrained network on the device
    with its kernels, `split` the held-out images of a validation run, `teacher` a distilled recipe's teacher."""

    cfg: TrainConfig
    data: MNIST
    device: torch.device
    facts: dict  # the hardware, as device.hardware() reports it: read once, for the resolution and the record
    model: Net
    split: Optional[Split]
    teacher: Optional[TrainConfig]
    params: int
    kernels_applied: dict  # what of the network trains on the C kernels (empty when the recipe's are native)
    models_file: Optional[dict]  # a user's models file as a run records it (models_file_record), or None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch_memory_format(self.cfg.memory_format)

    def record(self) -> dict:
        """What config.json keeps of the plan, in its order: the model, its parameters, the seed, the recipe."""
        return {"model": self.cfg.model, "params": self.params, "seed": self.cfg.seed, "config": self.cfg.to_dict()}


def make_plan(cfg: TrainConfig, data: MNIST, teacher: Optional[TrainConfig] = None, warn: bool = False) -> Plan:
    """The one place a recipe is resolved. Seeds every RNG with the recipe's seed, then builds the network, in the
    order a history depends on. `teacher`: a distilled recipe's teacher, as a recipe (the series' teacher_recipe
    resolves a step name to it, or a resumed run's saved state holds it): the core never looks a step up. `warn`:
    say in one line what this machine could not give. A resolved recipe (a resumed run's) stays as it is."""
    cfg = cfg.validate()
    if cfg.teacher and teacher is None:
        raise TinyMnistError(f"the recipe is distilled from {cfg.teacher!r}: its teacher's recipe must be given")
    if cfg.dropout is None and not cfg.user_model:  # record the dropout actually used, not "model default"
        cfg = replace(cfg, dropout=model_class(cfg.model).default_dropout)
    device = data.train_images.device
    facts = hardware(device)
    seed_everything(cfg.seed)
    cfg = resolve_for(cfg, device, facts, warn=warn)
    model = build_for(cfg, device)
    split = None
    if cfg.val:
        keep, held = (i.to(device) for i in validation_split(data.train_labels, cfg.val))
        split = Split(keep, held, {"images": cfg.val, "seed": VAL_SEED, "stratified": True,
                                   "fingerprint": split_fingerprint(held)})
    return Plan(cfg, data, device, facts, model, split, teacher if cfg.teacher else None, count_params(model),
                coverage(model) if cfg.kernels == "fused" else {},
                models_file_record(cfg) if cfg.models_file else None)


def models_file_record(cfg: TrainConfig) -> dict:
    """What a checkpoint and a run's config.json record of a user's models file: what to name again, never code to
    run."""
    return {"path": str(Path(cfg.models_file).resolve()), "sha256": file_sha256(cfg.models_file), "class": cfg.model}


def checked_model(cfg: TrainConfig) -> Net:
    """The untrained network of a recipe, built and checked: a layout that does not fit a 28x28 input, or a user's
    network whose forward fails or does not give 10 scores, is one TinyMnistError. Every network a plan trains is
    built here; a verb that only counts parameters calls it too, to fail before any data loads. The check runs on
    its own RNG state and in eval mode, so the network it returns is as built."""
    model = cfg.build_model()
    with torch.random.fork_rng(devices=[]):
        if cfg.layout:
            model.check_shapes()
        elif cfg.user_model:
            check_forward(model, cfg.model, cfg.models_file)
    return model


def resolve_for(cfg: TrainConfig, device: torch.device, facts: dict, warn: bool = True) -> TrainConfig:
    """The recipe with 'auto' precision, memory format and kernels replaced by what this machine gets (the rules of
    device.py and kernels.py); an explicit bf16 without native support, or fused kernels that do not build here,
    is one line on stderr."""
    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if warn else None
    precision = resolve_precision(cfg.precision, device, facts, warn=warn)
    memory_format = resolve_memory_format(cfg.memory_format, device, facts)
    if cfg.memory_format == "auto" and memory_format == "channels_last" and cfg.user_model:
        memory_format = _channels_last_trains(cfg, device, warn)
    kernels = resolve_kernels(cfg.kernels, device, precision, memory_format, note=warn)
    threads = torch.get_num_threads()
    if warn is not None and kernels == "native" and device.type == "cpu" and threads > 1:
        # the C kernels sum over fixed slices of the batch; PyTorch's batch norm and convolutions split their sums
        # by thread, so only on them does a run's history depend on its thread count
        warn(f"tinymnist: note: this run trains on PyTorch's own batch norm and convolutions (kernels native), whose "
             f"sums depend on the thread count: its history is the one of {threads} threads, not of another count")
    return replace(cfg, precision=precision, memory_format=memory_format, kernels=kernels)


def _channels_last_trains(cfg: TrainConfig, device: torch.device, warn) -> str:
    """A user's network may reshape with .view, which channels_last activations do not allow: one training step on
    a small random batch says whether it trains in channels_last; if not, it trains contiguous (one line says so).
    The probe draws from its own RNG state, so the run's history does not depend on it."""
    with torch.random.fork_rng(devices=[]):
        try:
            model = cfg.build_model().to(device, memory_format=torch.channels_last).train()
            x = torch.randn(4, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
            F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device=device)).backward()
            return "channels_last"
        except RuntimeError as e:
            if warn is not None:
                warn(f"tinymnist: note: {cfg.model} does not train in channels_last memory ("
                     f"{first_line(e)[:120]}); training it contiguous")
            return "contiguous"


def build_for(cfg: TrainConfig, device: torch.device) -> Net:
    """The untrained network of a resolved recipe, on `device`, in its memory format, with its kernels."""
    model = checked_model(cfg).to(device, memory_format=torch_memory_format(cfg.memory_format))
    if cfg.kernels == "fused":
        use_kernels(model)
        swap_sequentials(model)  # each chain of them trains as one program (the same results, fewer calls)
    return model
