"""The models of the series (Model_1, Model_2 and on), built from one block helper and a layout, and the registry of
every model a process can build by name: tinymnist's own and those a user registers with register_model."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import TinyMnistError, first_line

_REGISTRY: dict[str, type["Net"]] = {}  # tinymnist's own models, Model_1 ... Model_N
_REGISTERED: dict[str, type] = {}  # a user's classes, from @register_model (this process only)

# The registry of every model this process can build by name: tinymnist's own (@register) and a user's
# (@register_model). Loading a user's models file is usermodels.py's concern; it builds on this module.


def register(cls: type["Net"]) -> type["Net"]:
    """Class decorator: make one of tinymnist's models available by its class name."""
    _REGISTRY[cls.__name__] = cls
    return cls


def needs_arguments(cls: type) -> str:
    """Why `cls()` cannot work ('' if it can): the constructor's required parameters."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return ""
    required = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return f"its constructor needs {', '.join(required)}" if required else ""


def register_model(cls: type) -> type:
    """Class decorator, as in timm: make an nn.Module class (constructor without arguments) trainable, checkable and
    summarisable by its name in this process. Names of tinymnist's own models are refused."""
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise TinyMnistError(f"register_model takes an nn.Module class, got {cls!r}")
    why = needs_arguments(cls)
    if why:
        raise TinyMnistError(f"cannot register {cls.__name__}: {why} (a model is built with no arguments)")
    if cls.__name__ in _REGISTRY:
        raise TinyMnistError(f"{cls.__name__} is one of tinymnist's models: give yours another name")
    _REGISTERED[cls.__name__] = cls
    return cls


def is_user_model(name: Optional[str], models_file: str = "") -> bool:
    """The one test of whether a model is the user's own: a class of a models file, or one registered with
    register_model. Not one of tinymnist's models, whose dropout, layout, activation and bn_affine a recipe may change."""
    return bool(models_file) or (name is not None and name not in _REGISTRY and name in _REGISTERED)


def list_builtin_models() -> list[str]:
    """tinymnist's own models, Model_1 ... Model_N, in series order."""
    return sorted(_REGISTRY, key=lambda n: (len(n), n))


def list_models() -> list[str]:
    """Every model name this process knows: tinymnist's own, then those registered with register_model."""
    return list_builtin_models() + list(_REGISTERED)


def model_class(name: str) -> type["Net"]:
    """One of tinymnist's own model classes."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TinyMnistError(f"unknown model {name!r} (choose from {', '.join(list_models())})") from None


def create_model(name: str, dropout: Optional[float] = None, layout: Optional[str] = None,
                 activation: str = "", bn_affine: bool = True) -> nn.Module:
    """Build a model by name: one of ours (`dropout` overrides its default, a `layout` string replaces its layout, an
    `activation` of ACTIVATIONS replaces its ReLUs, `bn_affine=False` takes every batch norm's scale and shift
    away), or a class registered with register_model (built with no arguments)."""
    if is_user_model(name):
        if dropout is not None or layout or activation or not bn_affine:
            raise TinyMnistError(f"{name} is your own model: {OURS_ONLY} apply to tinymnist's models only")
        return _REGISTERED[name]()
    return model_class(name)(dropout=dropout, layout=layout or None, activation=activation or None,
                             bn_affine=bn_affine)


# what a recipe may change in tinymnist's own models, and not in a user's
OURS_ONLY = "dropout, layout, activation and bn_affine"

# the nonlinearity after every conv block's BN, by name (TrainConfig.activation). ReLU is every model's own, and the
# one the C kernels fuse with BN; the others train on PyTorch's ops.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),  # slope 0.1 below zero
}


def check_activation(name: str) -> str:
    """`name` if it is a key of ACTIVATIONS, else one TinyMnistError that lists them."""
    if name not in ACTIVATIONS:
        raise TinyMnistError(f"unknown activation {name!r} (choose from {', '.join(ACTIVATIONS)})")
    return name


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def block(cin: int, cout: int, k: int = 3, padding: int = 0, bn: bool = True, dropout: float = 0.0,
          stride: int = 1, dilation: int = 1, groups: int = 1, activation: str = "relu",
          affine: bool = True) -> nn.Sequential:
    """conv -> (BN) -> activation (ReLU unless named) -> (dropout). The conv has no bias when BN follows, since BN's
    shift replaces it. `affine=False`: the BN only normalises (no learned scale and shift, 2 x cout parameters
    fewer); the activation then sees each channel at mean 0 and variance 1."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                                         groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout, affine=affine))
    layers.append(ACTIVATIONS[activation]())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- layouts as text
#
# LAYOUT GRAMMAR. A layout is a string of tokens separated by spaces, read left to right from the 1x28x28 input.
#
#   cN           a conv block (conv -> BN -> ReLU -> optional dropout) with N output channels, 3x3, no padding
#   cN/K         the same with a KxK kernel: c10/1 is a 1x1 transition
#     suffixes, in this order, each optional:
#     p          "same" padding (K//2 x dilation), so the block keeps the map size
#     dD         dilation D (RF grows by (K-1) x D x jump)
#     sS         stride S
#     gG         G groups; "gN" with N = the input channels is a depthwise conv
#     rR         the block R times in a row with ONE conv weight (tied), each time with its own BN: R-1 more layers
#                of depth for 2 x N parameters each. The conv must keep its channels (input = N), so c16r3 after
#                a 16-channel block is three 16-channel convs that share their 9 x 16 x 16 weights
#   dw, dw/K     a depthwise KxK block: as many output channels as input channels, one filter each (dw takes
#                [p][dD][sS][rR] too)
#   +N           a skip connection over the last N blocks (N conv tokens in a row, a tied repeat counting each of its
#                layers): their input, cropped at the centre to their output's size (an unpadded 3x3 block takes one
#                pixel off each side), is added to their output. No parameters; the N blocks must end with the
#                channels they started with
#   P            2x2 max pool
#   G            global average pool to 1x1
#   o, o/K       the classifier: a plain conv to 10 channels (1x1, or KxK), no BN or ReLU; last token
#
# Examples: "c8 c16 P c10/1 c16 c16 c16 G o" is Model_7; "c8p c8 P dw c16/1 ..." starts a depthwise-separable net.
# Without BN (a model class with bn = False) every conv has a bias; with BN none does, as BN's shift replaces it.

_CONV = re.compile(r"c(?P<out>\d+)(?:/(?P<k>\d+))?(?P<same>p)?(?:d(?P<d>\d+))?(?:s(?P<s>\d+))?(?:g(?P<g>\d+))?"
                   r"(?:r(?P<r>\d+))?")
_DW = re.compile(r"dw(?:/(?P<k>\d+))?(?P<same>p)?(?:d(?P<d>\d+))?(?:s(?P<s>\d+))?(?:r(?P<r>\d+))?")
_OUT = re.compile(r"o(?:/(?P<k>\d+))?")
_SKIP = re.compile(r"\+(?P<n>\d+)")


@dataclass(frozen=True)
class Layer:
    """One parsed token: kind is conv, skip, pool, gap or out; convs carry their geometry, a skip how many blocks it
    spans (in `repeat`)."""

    kind: str
    out: int = 0  # output channels (0 for a depthwise conv: as many as its input)
    k: int = 3
    pad: int = 0
    dilation: int = 1
    stride: int = 1
    groups: int = 1  # 0 for a depthwise conv: as many as its input channels
    repeat: int = 1  # the block this many times in a row, one conv weight shared by all (each has its own BN)


def parse_layout(text: str) -> tuple[Layer, ...]:
    """Parse a layout string (grammar above); any bad token is one TinyMnistError naming it."""
    tokens = text.split()
    if not tokens:
        raise TinyMnistError("empty layout")
    layers = []
    for i, tok in enumerate(tokens):
        if tok == "P":
            layers.append(Layer("pool"))
        elif tok == "G":
            layers.append(Layer("gap"))
        elif m := _SKIP.fullmatch(tok):
            if int(m["n"]) < 1:
                raise TinyMnistError(f"layout {text!r}: token {tok!r} has a zero size")
            layers.append(Layer("skip", repeat=int(m["n"])))
        elif m := _OUT.fullmatch(tok):
            if i != len(tokens) - 1:
                raise TinyMnistError(f"layout {text!r}: the classifier {tok!r} must be the last token")
            layers.append(Layer("out", out=10, k=int(m["k"] or 1)))
        elif m := _CONV.fullmatch(tok) or _DW.fullmatch(tok):
            k, d = int(m["k"] or 3), int(m["d"] or 1)
            dw = tok.startswith("dw")
            layer = Layer("conv", out=0 if dw else int(m["out"]), k=k, pad=(k // 2) * d if m["same"] else 0,
                          dilation=d, stride=int(m["s"] or 1), groups=0 if dw else int(m["g"] or 1),
                          repeat=int(m["r"] or 1))
            if min(k, d, layer.stride, layer.repeat) < 1 or (not dw and (layer.out < 1 or layer.groups < 1)):
                raise TinyMnistError(f"layout {text!r}: token {tok!r} has a zero size")
            layers.append(layer)
        else:
            raise TinyMnistError(
                f"layout {text!r}: unknown token {tok!r} (expected cN[/K][p][dD][sS][gG], dw[/K][p][dD][sS], +N, P, "
                "G, o or o/K; see model.py)")
    if layers[-1].kind != "out":
        raise TinyMnistError(f"layout {text!r}: must end with the classifier 'o' (or 'o/K')")
    return tuple(layers)


class Skip(nn.Module):
    """A skip connection (the layout token +N): `body`'s input, cropped at the centre to its output's size, added
    to its output. No parameters of its own."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        dh, dw = x.shape[-2] - y.shape[-2], x.shape[-1] - y.shape[-1]
        if dh < 0 or dw < 0 or dh % 2 or dw % 2:
            raise RuntimeError(f"a skip connection cannot add a {tuple(x.shape[-2:])} input to a "
                               f"{tuple(y.shape[-2:])} output (the blocks it spans must shrink it evenly)")
        if dh or dw:
            x = x[..., dh // 2: x.shape[-2] - dh // 2, dw // 2: x.shape[-1] - dw // 2]
        return y + x


class Net(nn.Module):
    """A CNN assembled from a layout string; subclasses only set the layout and defaults. Returns logits (N, 10)."""

    layout: str = ""  # in the layout grammar above
    bn: bool = True  # batch norm in every conv block
    default_dropout: float = 0.0  # dropout after every conv block, unless overridden at construction
    activation: str = "relu"  # after every conv block's BN: a key of ACTIVATIONS
    bn_affine: bool = True  # every BN learns its scale and shift (False: it only normalises)

    def __init__(self, dropout: Optional[float] = None, layout: Optional[str] = None,
                 activation: Optional[str] = None, bn_affine: Optional[bool] = None):
        super().__init__()
        p = self.default_dropout if dropout is None else dropout
        if layout is not None:
            self.layout = layout  # an instance attribute: the class keeps its own
        if activation is not None:
            self.activation = check_activation(activation)
        if bn_affine is not None:
            self.bn_affine = bool(bn_affine)
        layers: list[nn.Module] = []
        c = 1
        blocks: list[int] = []  # the input channels of each conv block at the end of `layers`, in a row
        for layer in parse_layout(self.layout):
            if layer.kind != "conv" and layer.kind != "skip":
                blocks = []
            if layer.kind == "conv":
                cout, groups = layer.out or c, layer.groups or c
                if c % groups or cout % groups:
                    raise TinyMnistError(f"layout {self.layout!r}: {groups} groups do not divide {c} -> {cout} channels")
                if layer.repeat > 1 and c != cout:
                    raise TinyMnistError(f"layout {self.layout!r}: a tied repeat (rR) must keep its channels, "
                                         f"not take {c} to {cout}")
                geometry = (layer.k, layer.pad, self.bn, p, layer.stride, layer.dilation, groups, self.activation,
                            self.bn_affine)
                first = block(c, cout, *geometry)
                layers.append(first)
                blocks.append(c)
                for _ in range(layer.repeat - 1):  # the same weight (one Parameter), a BN of its own
                    again = block(c, cout, *geometry)
                    again[0].weight = first[0].weight
                    if again[0].bias is not None:
                        again[0].bias = first[0].bias
                    layers.append(again)
                    blocks.append(cout)
                c = cout
            elif layer.kind == "skip":
                n = layer.repeat
                if n > len(blocks):
                    raise TinyMnistError(f"layout {self.layout!r}: +{n} spans {n} blocks, but only {len(blocks)} "
                                         "conv blocks come right before it")
                if blocks[-n] != c:
                    raise TinyMnistError(f"layout {self.layout!r}: +{n} adds {blocks[-n]} channels to {c}: the blocks "
                                         "it spans must end with the channels they started with")
                body = layers[-n:]
                del layers[-n:]
                layers.append(Skip(nn.Sequential(*body)))
                blocks = []  # a skip is one unit: a later one spans blocks after it
            elif layer.kind == "pool":
                layers.append(nn.MaxPool2d(2))
            elif layer.kind == "gap":
                layers.append(nn.AdaptiveAvgPool2d(1))
            else:
                layers.append(nn.Conv2d(c, 10, layer.k, bias=not self.bn))
        layers.append(nn.Flatten())
        self.net = nn.Sequential(*layers)
        self.dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def num_params(self) -> int:
        return count_params(self)

    def check_shapes(self) -> None:
        """Run one blank image through the net: a layout that shrinks the map below a kernel, or does not end
        at 1x1, is one TinyMnistError."""
        was = self.training
        try:
            with torch.no_grad():
                out = self.eval()(torch.zeros(1, 1, 28, 28, device=next(self.parameters()).device))
        except RuntimeError as e:
            raise TinyMnistError(f"layout {self.layout!r} does not fit a 28x28 input: {first_line(e)}") from None
        finally:
            self.train(was)
        if tuple(out.shape) != (1, 10):
            raise TinyMnistError(f"layout {self.layout!r} gives an output of shape {tuple(out.shape[1:])}, not (10,): "
                                 "end with G o, or shrink the map to 1x1 before o")


# ---------------------------------------------------------------- the series, in experiment order
# Shapes are for a 1x28x28 input; RF is the receptive field on the input, in pixels.


@register
class Model_1(Net):
    """First working setup: wide, no batch norm, a big 6x6 classifier conv."""

    bn = False
    # (N,32,24,24) RF 5 | pool (N,32,12,12) RF 6 | (N,64,6,6) RF 18 | 6x6 classifier (N,10,1,1) RF 28
    layout = "c16 c32 P c64 c64 c64 o/6"


@register
class Model_2(Net):
    """Skeleton: the final shape (two blocks, pool + 1x1 transition, three blocks, classifier), still wide."""

    bn = False
    # (N,32,24,24) RF 5 | pool + 1x1 squeeze (N,16,12,12) RF 6 | (N,32,6,6) RF 18 | (N,10,1,1) RF 28
    layout = "c16 c32 P c16/1 c16 c32 c32 o/6"


@register
class Model_3(Net):
    """Lighter: the skeleton with channels cut to get under 8,000 parameters."""

    bn = False
    # (N,12,24,24) RF 5 | (N,8,12,12) RF 6 | (N,10,6,6) RF 18 | (N,10,1,1) RF 28
    layout = "c8 c12 P c8/1 c10 c10 c10 o/6"


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
    # (N,16,24,24) RF 5 | (N,8,12,12) RF 6 | (N,16,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c16 P c8/1 c16 c16 c16 G o"


@register
class Model_7(Net):
    """Model_6 with 324 parameters more, spent on a wider transition (10 channels, not 8)."""

    # (N,16,24,24) RF 5 | (N,10,12,12) RF 6 | (N,16,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c16 P c10/1 c16 c16 c16 G o"


@register
class Model_8(Net):
    """Half the budget: Model_7's shape at 12 channels where it had 16 and an 8-channel transition (4,736 params).
    Chosen by validation among the layouts of spaces/half-budget*.toml, never on the test set."""

    # (N,12,24,24) RF 5 | (N,8,12,12) RF 6 | (N,12,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c12 P c8/1 c12 c12 c12 G o"


@register
class Model_9(Net):
    """At most 6,000 parameters (5,968): Model_8's front with a 10-channel transition and a body that widens with
    depth (12, 14, 16). Chosen by validation over 2 seeds in spaces/frontier-6000.toml, never on the test set."""

    # (N,12,24,24) RF 5 | (N,10,12,12) RF 6 | (N,12,10,10) (N,14,8,8) (N,16,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c12 P c10/1 c12 c14 c16 G o"


@register
class Model_10(Net):
    """At most 7,000 parameters (6,948): Model_7 with a 12-channel second layer and a 14-channel first block after the
    transition. Chosen by validation over 2 seeds in spaces/frontier-7000.toml, never on the test set."""

    # (N,12,24,24) RF 5 | (N,10,12,12) RF 6 | (N,14,10,10) (N,16,8,8) (N,16,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c12 P c10/1 c14 c16 c16 G o"


@register
class Model_11(Net):
    """At most 5,000 parameters (4,810): Model_8's front and a depthwise-separable body after the pool, each 3x3
    filter per channel followed by a 1x1 mix to 32 channels. Chosen by validation over 2 seeds in
    spaces/frontier-5000.toml, never on the test set."""

    # (N,12,24,24) RF 5 | (N,10,12,12) RF 6 | dw (N,10,10,10) 1x1 (N,32,10,10) | dw (N,32,8,8) 1x1 (N,32,8,8) |
    # dw (N,32,6,6) 1x1 (N,32,6,6) RF 18 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c12 P c10/1 dw c32/1 dw c32/1 dw c32/1 G o"


@register
class Model_12(Net):
    """Write-up 002's network (../shared/seeds/): three 8-channel 3x3 convs, a pool, three 16-channel ones and a 1x1
    to the 10 classes after the average pool, with no 1x1 transition (7,288 parameters). Screened on validation with
    the final step's recipe in screens/writeups.toml, never on the test set."""

    # (N,8,22,22) RF 7 | (N,8,11,11) RF 8 | (N,16,5,5) RF 20 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c8 c8 P c16 c16 c16 G o"


@register
class Model_13(Net):
    """Write-up 002's shape narrowed to 6,476 parameters: a 6-channel first conv, two of 8, a pool, three 15-channel
    convs and a 1x1 to the 10 classes after the average pool. Chosen on validation in screens/plain-7000.toml (2
    seeds, then a 5-seed validation check past the gate), never on the test set."""

    # (N,8,22,22) RF 7 | (N,8,11,11) RF 8 | (N,15,5,5) RF 20 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c6 c8 c8 P c15 c15 c15 G o"


@register
class Model_14(Net):
    """Write-up 002's front (three 8-channel convs, a pool) feeding three depthwise-separable blocks to 32 channels,
    with GELU after every batch norm, 4,880 parameters. Chosen on validation in screens/dw-batch32-5000.toml at batch
    32 (2 seeds, then a 5-seed validation check past the gate), never on the test set."""

    # (N,8,22,22) RF 7 | (N,8,11,11) RF 8 | dw + 1x1 x3: (N,32,5,5) RF 20 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c8 c8 P dw c32/1 dw c32/1 dw c32/1 G o"
    activation = "gelu"


@register
class Model_15(Net):
    """Model_14 grown to 7,628 parameters for a margin: an 8-12-12 front and three depthwise-separable blocks to 40
    channels, with GELU after every batch norm. Chosen on validation in screens/dw-8000.toml (2 seeds, then a 5-seed
    validation check past the gate), never on the test set."""

    # (N,12,22,22) RF 7 | (N,12,11,11) RF 8 | dw + 1x1 x3: (N,40,5,5) RF 20 | GAP + 1x1 (N,10,1,1) RF 28
    layout = "c8 c12 c12 P dw c40/1 dw c40/1 dw c40/1 G o"
    activation = "gelu"
