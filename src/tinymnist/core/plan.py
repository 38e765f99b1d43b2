"""A recipe resolved once: the recipe, the data on its device and a teacher become a plan (the filled-in recipe, what
this machine gives it, the built network, the held-out split and its fingerprint), which the trainer trains and
the run directory writes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..accel.device import hardware, seed_everything, torch_memory_format
from ..accel.placement import apply, place, resolve
from ..errors import TinyMnistError
from ..models.build import build_network, file_record
from ..models.model import Net
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
    record: dict  # what config.json keeps of the plan, in its order: the model, its parameters, the seed, the recipe

    @property
    def memory_format(self) -> torch.memory_format:
        return torch_memory_format(self.cfg.memory_format)


def make_plan(cfg: TrainConfig, data: MNIST, teacher: Optional[TrainConfig] = None, warn: bool = False,
              facts: Optional[dict] = None) -> Plan:
    """The one place a recipe is resolved, each layer called once and in this order: the recipe's values checked
    (a config is plain data: this builds nothing), the held-out split drawn (from its own seed), every RNG seeded
    with the recipe's seed, the network built and checked (models.build_network), and placed on this machine
    (accel.placement.place: "auto" precision, memory format and kernels resolved, the C kernels applied). `teacher`:
    a distilled recipe's teacher, as a recipe (the series' teacher_recipe resolves a step name to it, or a resumed
    run's saved state holds it): the core never looks a step up. `warn`: say in one line what this machine could
    not give. `facts`: the hardware as device.hardware() reported it, when the caller has read it already (a run
    records it beside the plan). A resolved recipe (a resumed run's) stays as it is."""
    cfg = cfg.check_values()
    if cfg.teacher and teacher is None:
        raise TinyMnistError(f"the recipe is distilled from {cfg.teacher!r}: its teacher's recipe must be given")
    device = data.train_images.device
    facts = hardware(device) if facts is None else facts
    split = None
    if cfg.val:
        keep, held = (i.to(device) for i in validation_split(data.train_labels, cfg.val))
        split = Split(keep, held, {"images": cfg.val, "seed": VAL_SEED, "stratified": True,
                                   "fingerprint": split_fingerprint(held)})
    seed_everything(cfg.seed)
    net = build_network(**cfg.network())
    model, placed = place(net.model, device, facts, cfg.precision, cfg.memory_format, cfg.kernels, user=net.user,
                          warn=warn)
    cfg = replace(cfg, dropout=net.dropout, precision=placed.precision, memory_format=placed.memory_format,
                  kernels=placed.kernels)
    record = {"model": cfg.model, "params": net.params, "seed": cfg.seed, "config": cfg.to_dict()}
    return Plan(cfg, data, device, facts, model, split, teacher if cfg.teacher else None, net.params,
                placed.kernels_applied, net.models_file, record)


def models_file_record(cfg: TrainConfig) -> dict:
    """What a checkpoint and a run's config.json record of a user's models file: what to name again, never code to
    run."""
    return file_record(cfg.models_file, cfg.model)


def checked_model(cfg: TrainConfig) -> Net:
    """The untrained network of a recipe, built and checked (models.build_network): a verb that only counts
    parameters calls it, to fail before any data loads."""
    return build_network(**cfg.network()).model


def resolve_for(cfg: TrainConfig, device: torch.device, facts: dict, warn: bool = True) -> TrainConfig:
    """The recipe with "auto" precision, memory format and kernels replaced by what this machine gets, without a
    network (bench resolves a recipe for several networks)."""
    precision, memory_format, kernels = resolve(cfg.precision, cfg.memory_format, cfg.kernels, device, facts, warn)
    return replace(cfg, precision=precision, memory_format=memory_format, kernels=kernels)


def build_for(cfg: TrainConfig, device: torch.device) -> Net:
    """The untrained network of a resolved recipe, on `device`, in its memory format, with its kernels."""
    return apply(checked_model(cfg), device, cfg.memory_format, cfg.kernels)
