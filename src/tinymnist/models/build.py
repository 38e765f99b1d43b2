"""A recipe's network, built and checked in one call: the whole part the models layer plays when a recipe is resolved
(core/plan.py). It takes the recipe's network fields as plain values, so it knows nothing of the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import TinyMnistError
from .model import (OURS_ONLY, check_activation, count_params, create_model, is_user_model, list_models, model_class,
                    parse_layout)
from .userfile import check_forward, file_sha256, load_models_file


@dataclass(frozen=True)
class Network:
    """The untrained network of a recipe, as built: `dropout` is the one it trains with (a model's default filled
    in; None for a user's network), `user` whether it is the user's own, `models_file` what a run records of a
    user's models file (file_record), or None."""

    model: nn.Module
    dropout: Optional[float]
    user: bool
    params: int
    models_file: Optional[dict]


def check_network(model: str, dropout: Optional[float] = None, layout: str = "", activation: str = "",
                  bn_affine: bool = True, models_file: str = "") -> bool:
    """The network fields of a recipe, checked without building anything: a user's model takes none of ours
    (OURS_ONLY), a model of ours must exist, and an activation or a layout must parse. Returns whether the model
    is the user's own. Every problem is one TinyMnistError."""
    user = is_user_model(model, models_file)
    if user:
        if dropout is not None or layout or activation or not bn_affine:
            raise TinyMnistError(f"{model} is your own model: {OURS_ONLY} apply to tinymnist's models only")
    elif model not in list_models():
        raise TinyMnistError(f"unknown model {model!r} (choose from {', '.join(list_models())})")
    if activation:
        check_activation(activation)
    if layout:
        parse_layout(layout)  # the grammar only: build_network checks the shapes
    return user


def create_network(model: str, dropout: Optional[float] = None, layout: str = "", activation: str = "",
                   bn_affine: bool = True, models_file: str = "") -> nn.Module:
    """The untrained network of a recipe's network fields, unchecked: one of ours, or the user's class (from
    `models_file`, or registered in this process)."""
    if models_file:
        return load_models_file(models_file).build(model)
    return create_model(model, dropout=dropout, layout=layout, activation=activation, bn_affine=bn_affine)


def build_network(model: str, dropout: Optional[float] = None, layout: str = "", activation: str = "",
                  bn_affine: bool = True, models_file: str = "") -> Network:
    """The untrained network of a recipe, checked and built: a layout that does not fit a 28x28 input, or a user's
    network whose forward fails or does not give 10 scores, is one TinyMnistError. The build draws its weights from
    the global RNG (the caller seeds it); the shape check runs on its own RNG state and in eval mode, so the network
    returned is as built."""
    user = check_network(model, dropout, layout, activation, bn_affine, models_file)
    if dropout is None and not user:  # record the dropout actually used, not "model default"
        dropout = model_class(model).default_dropout
    net = create_network(model, dropout, layout, activation, bn_affine, models_file)
    with torch.random.fork_rng(devices=[]):
        if layout:
            net.check_shapes()
        elif user:
            check_forward(net, model, models_file)
    return Network(net, None if user else dropout, user, count_params(net),
                   file_record(models_file, model) if models_file else None)


def file_record(path: str, name: str) -> dict:
    """What a checkpoint and a run's config.json record of a user's models file: what to name again, never code to
    run."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "class": name}
