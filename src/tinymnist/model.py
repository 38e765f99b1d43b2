"""The models of the experiment series, Model_1 ... Model_N, built from one block helper and a layout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import TinyMnistError

_REGISTRY: dict[str, type["Net"]] = {}


def register(cls: type["Net"]) -> type["Net"]:
    """Class decorator: make a model available by its class name."""
    _REGISTRY[cls.__name__] = cls
    return cls


def list_models() -> list[str]:
    """Registered model names, in series order."""
    return sorted(_REGISTRY, key=lambda n: (len(n), n))


def model_class(name: str) -> type["Net"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TinyMnistError(f"unknown model {name!r} (choose from {', '.join(list_models())})") from None


def create_model(name: str, dropout: Optional[float] = None) -> "Net":
    """Build a registered model; `dropout` overrides the model's default."""
    return model_class(name)(dropout=dropout)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def block(cin: int, cout: int, k: int = 3, padding: int = 0, bn: bool = True, dropout: float = 0.0) -> nn.Sequential:
    """conv -> (BN) -> ReLU -> (dropout). The conv has no bias when BN follows, since BN's shift replaces it."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=padding, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


# Layout vocabulary: each entry is a tuple whose first item says what it is.
#   ("conv", out_channels, kernel, padding)  a block(): conv -> BN -> ReLU -> dropout
#   ("pool",)                                2x2 max pool
#   ("gap",)                                 global average pool to 1x1
#   ("out", kernel)                          the classifier: a plain conv to 10 channels, no BN/ReLU
def conv(out: int, k: int = 3, pad: int = 0) -> tuple:
    return ("conv", out, k, pad)


POOL, GAP = ("pool",), ("gap",)


def out(k: int = 1) -> tuple:
    return ("out", k)


class Net(nn.Module):
    """A CNN assembled from `layout`; subclasses only set the layout and defaults. Returns logits (N, 10)."""

    layout: tuple = ()
    bn: bool = True  # batch norm in every conv block
    default_dropout: float = 0.0  # dropout after every conv block, unless overridden at construction

    def __init__(self, dropout: Optional[float] = None):
        super().__init__()
        p = self.default_dropout if dropout is None else dropout
        layers: list[nn.Module] = []
        c = 1
        for kind, *args in self.layout:
            if kind == "conv":
                cout, k, pad = args
                layers.append(block(c, cout, k, pad, self.bn, p))
                c = cout
            elif kind == "pool":
                layers.append(nn.MaxPool2d(2))
            elif kind == "gap":
                layers.append(nn.AdaptiveAvgPool2d(1))
            elif kind == "out":
                layers.append(nn.Conv2d(c, 10, args[0], bias=not self.bn))
            else:
                raise ValueError(f"unknown layout entry {kind!r}")
        layers.append(nn.Flatten())
        self.net = nn.Sequential(*layers)
        self.dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def num_params(self) -> int:
        return count_params(self)


# ---------------------------------------------------------------- the series, in experiment order
# Shapes are for a 1x28x28 input; RF is the receptive field on the input, in pixels.


@register
class Model_1(Net):
    """First working setup: wide, no batch norm, a big 6x6 classifier conv."""

    bn = False
    layout = (
        conv(16), conv(32),  # (N,32,24,24) RF 5
        POOL,  # (N,32,12,12) RF 6
        conv(64), conv(64), conv(64),  # (N,64,6,6) RF 18
        out(6),  # (N,10,1,1) RF 28
    )


@register
class Model_2(Net):
    """Skeleton: the final shape (two blocks, pool + 1x1 transition, three blocks, classifier), still wide."""

    bn = False
    layout = (
        conv(16), conv(32),  # (N,32,24,24) RF 5
        POOL, conv(16, k=1),  # (N,16,12,12) RF 6: the transition squeezes channels
        conv(16), conv(32), conv(32),  # (N,32,6,6) RF 18
        out(6),  # (N,10,1,1) RF 28
    )


@register
class Model_3(Net):
    """Lighter: the skeleton with channels cut to get under 8,000 parameters."""

    bn = False
    layout = (
        conv(8), conv(12),  # (N,12,24,24) RF 5
        POOL, conv(8, k=1),  # (N,8,12,12) RF 6
        conv(10), conv(10), conv(10),  # (N,10,6,6) RF 18
        out(6),  # (N,10,1,1) RF 28
    )


@register
class Model_4(Model_3):
    """Model_3 with batch norm after every conv."""

    bn = True


@register
class Model_5(Model_4):
    """Model_4 with dropout after every block."""

    default_dropout = 0.05


@register
class Model_6(Net):
    """GAP head: the 3,600-parameter 6x6 classifier becomes GAP + 1x1, and the saving buys wider layers."""

    default_dropout = 0.05
    layout = (
        conv(8), conv(16),  # (N,16,24,24) RF 5
        POOL, conv(8, k=1),  # (N,8,12,12) RF 6
        conv(16), conv(16), conv(16),  # (N,16,6,6) RF 18
        GAP, out(1),  # (N,10,1,1) RF 28
    )



@register
class Model_7(Net):
    """Model_6 with the last 324 parameters of the budget spent on a wider transition (10 channels, not 8)."""

    layout = (
        conv(8), conv(16),  # (N,16,24,24) RF 5
        POOL, conv(10, k=1),  # (N,10,12,12) RF 6
        conv(16), conv(16), conv(16),  # (N,16,6,6) RF 18
        GAP, out(1),  # (N,10,1,1) RF 28
    )
