"""Frozen training configs. Every field is saved with every result and checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..accel.device import MEMORY_FORMATS, PRECISIONS
from ..accel.kernels import KERNELS
from ..errors import TinyMnistError

OPTIMIZERS = ("sgd", "adam", "adamw")
MACHINE_FIELDS = ("precision", "memory_format", "kernels")  # "auto" resolves per machine; a run records the result
SCHEDULERS = ("none", "step", "onecycle")


@dataclass(frozen=True)
class AugConfig:
    """Per-sample random affine jitter and erasing, applied to a whole batch at once."""

    rotate: float = 0.0  # max rotation in degrees, drawn uniformly from [-rotate, rotate]
    translate: float = 0.0  # max shift as a fraction of the image side, per axis
    scale: float = 0.0  # max relative zoom: factor drawn from [1 - scale, 1 + scale]
    erase_p: float = 0.0  # probability that a sample gets one random black rectangle
    erase_area: tuple = (0.02, 0.15)  # min and max erased fraction of the image area

    @property
    def active(self) -> bool:
        return bool(self.rotate or self.translate or self.scale or self.erase_p)

    def validate(self) -> None:
        if not (0 <= self.rotate <= 180):
            raise TinyMnistError(f"aug.rotate must be in [0, 180] degrees, got {self.rotate}")
        if not (0 <= self.translate < 1):
            raise TinyMnistError(f"aug.translate must be in [0, 1), got {self.translate}")
        if not (0 <= self.scale < 1):
            raise TinyMnistError(f"aug.scale must be in [0, 1), got {self.scale}")
        if not (0 <= self.erase_p <= 1):
            raise TinyMnistError(f"aug.erase_p must be in [0, 1], got {self.erase_p}")
        lo, hi = self.erase_area
        if not (0 < lo <= hi < 1):
            raise TinyMnistError(f"aug.erase_area must satisfy 0 < min <= max < 1, got {self.erase_area}")


def _field(default: Any, help: str, *, ok: Optional[Callable[[Any], bool]] = None, expected: str = "",
           choices: Optional[tuple] = None, cli: bool = False, convert: Optional[Callable] = None, metavar: str = ""):
    """A recipe field with what the CLI and validate() need, written once: its help, the values it takes (`choices`,
    or `ok` with the words for what it `expected`), and whether the training verbs take it as --an-option."""
    meta = {"help": help, "ok": ok, "expected": expected, "choices": choices, "cli": cli, "convert": convert,
            "metavar": metavar}
    return field(default=default, metadata=meta)


_POSITIVE, _NON_NEGATIVE = (lambda v: v >= 1, "a positive integer"), (lambda v: v >= 0, "a non-negative integer")
_FRACTION = (lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe: model, optimisation, schedule and augmentation. Each field's help, accepted values and
    command-line option are its metadata: the CLI's recipe options and validate() are generated from them."""

    model: str = _field("Model_1", "registry name of the model class, or a class of models_file")
    layout: str = _field("", "train this network instead of the model's own, in the layout grammar of model.py, e.g. "
                         '"c8 c16 P c10/1 c16 c16 c16 G o"; "" keeps the model\'s own', cli=True, metavar="TEXT")
    epochs: int = _field(15, "full passes over the training images", ok=_POSITIVE[0], expected=_POSITIVE[1],
                         cli=True, convert=int)
    batch_size: int = _field(128, "training batch size", ok=_POSITIVE[0], expected=_POSITIVE[1], cli=True, convert=int)
    optimizer: str = _field("sgd", "optimizer", choices=OPTIMIZERS, cli=True)
    lr: float = _field(0.01, "learning rate (the peak LR under onecycle)", ok=lambda v: v > 0,
                       expected="a positive number", cli=True, convert=float)
    momentum: float = _field(0.9, "SGD momentum (ignored by Adam/AdamW)", ok=_FRACTION[0], expected=_FRACTION[1])
    nesterov: bool = _field(True, "Nesterov momentum for SGD")
    sam_rho: float = _field(0.0, "sharpness-aware minimisation: each step takes the gradient at the weights moved "
                            "uphill by this radius (a second forward and backward pass per batch, counted in the "
                            "time, not in the epochs); 0 = off", ok=lambda v: v >= 0, expected="a non-negative number",
                            cli=True, convert=float)
    weight_decay: float = _field(0.0, "weight decay: L2 (SGD, Adam) or decoupled (AdamW)", ok=lambda v: v >= 0,
                                 expected="a non-negative number", cli=True, convert=float)
    scheduler: str = _field("none", "LR schedule: onecycle steps every batch, step every epoch", choices=SCHEDULERS,
                            cli=True)
    step_size: int = _field(5, "StepLR: epochs between LR drops", ok=_POSITIVE[0], expected=_POSITIVE[1])
    gamma: float = _field(0.1, "StepLR: factor of each drop", ok=lambda v: 0 < v <= 1, expected="a number in (0, 1]")
    pct_start: float = _field(0.25, "OneCycleLR: fraction of the steps spent warming up", ok=lambda v: 0 < v < 1,
                              expected="a number in (0, 1)")
    div_factor: float = _field(10.0, "OneCycleLR: initial LR = lr / div_factor")
    final_div_factor: float = _field(100.0, "OneCycleLR: final LR = initial LR / final_div_factor")
    cycle_epochs: int = _field(0, "OneCycleLR: the epochs the cycle spans (0 = all); the LR then stays at its final "
                               "value, so the last epochs train nearly the same model", ok=_NON_NEGATIVE[0],
                               expected=_NON_NEGATIVE[1])
    dropout: Optional[float] = _field(None, "dropout after each conv block (None keeps the model's own default)",
                                      ok=lambda v: v is None or 0 <= v < 1, expected=_FRACTION[1], cli=True,
                                      convert=float)
    activation: str = _field("", "the nonlinearity after each conv block of tinymnist's models, by its name in "
                             "model.py's ACTIVATIONS (a wrong name lists them); '' keeps the model's own (ReLU)",
                             cli=True, convert=str)
    bn_affine: bool = _field(True, "every batch norm of tinymnist's models learns a scale and a shift per channel; "
                             "false: it only normalises, 2 parameters per channel fewer")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing", ok=_FRACTION[0], expected=_FRACTION[1])
    teacher: str = _field("", "distillation, a track of its own: the step whose network teaches. Its recipe trains "
                          "first in the same run, on the same training images (the same held-out split) and seed, "
                          "and its epochs are recorded and stated beside the student's; '' = no teacher",
                          cli=True, convert=str, metavar="STEP")
    distill: float = _field(0.5, "with a teacher: the weight of the teacher's softened outputs in the loss (the rest "
                            "is the labels' cross-entropy)", ok=lambda v: 0 < v <= 1, expected="a number in (0, 1]",
                            cli=True, convert=float)
    distill_temp: float = _field(4.0, "with a teacher: the softmax temperature of the distillation term",
                                 ok=lambda v: v > 0, expected="a positive number", cli=True, convert=float)
    ema: float = _field(0.0, "decay of a moving average of the weights (and BN statistics) that is evaluated and "
                        "saved instead of the raw weights; it smooths out the epoch-to-epoch noise of SGD; 0 = off",
                        ok=_FRACTION[0], expected=_FRACTION[1])
    aug: AugConfig = field(default_factory=AugConfig, metadata={"help": "training-time augmentation"})
    aug_epochs: int = _field(0, "augment the first this many epochs only (0 = every epoch); the last epochs then "
                             "train on the images as they are", ok=_NON_NEGATIVE[0], expected=_NON_NEGATIVE[1])
    precision: str = _field("fp32", "bf16 autocasts forward passes to bfloat16; auto picks it only where the hardware "
                            "has it natively (AMX or AVX-512 BF16 on a CPU, compute capability 8.0+ on CUDA); a run "
                            "records what it resolved to", choices=PRECISIONS, cli=True)
    memory_format: str = _field("auto", "activation layout; auto: channels_last on x86 CPUs with AVX2 (the rule in "
                                "device.py), else contiguous; a run records what it resolved to",
                                choices=MEMORY_FORMATS, cli=True)
    kernels: str = _field("auto", "fused: {ops} on the C kernels of kernels.py (built once with the system's C "
                          "compiler); native: PyTorch's; auto: fused where they apply (a CPU, fp32, channels_last) "
                          "and build; a run records what it resolved to", choices=KERNELS, cli=True)
    seed: int = _field(0, "seeds every RNG: init, batch order, augmentation", ok=lambda v: v >= 0,
                       expected=_NON_NEGATIVE[1])
    eval_batch_size: int = _field(2000, "evaluation batch size (no gradients, so large is cheap)", ok=_POSITIVE[0],
                                  expected=_POSITIVE[1])
    limit_batches: int = _field(0, "train and evaluate at most this many batches per epoch (0 = all; smoke tests)",
                                ok=_NON_NEGATIVE[0], expected=_NON_NEGATIVE[1], cli=True, convert=int)
    val: int = _field(0, "hold out this many training images (class-stratified, a fixed split) and record val_acc "
                      "per epoch; check then judges the rule on validation accuracy", ok=lambda v: 0 <= v < 60000,
                      expected="a number of images from 0 to 59999", cli=True, convert=int)
    models_file: str = _field("", "a user's Python file of nn.Module classes (--models); model then names a class in "
                              "it")

    def validate(self) -> "TrainConfig":
        """Raise TinyMnistError on a value that cannot train; return self. The network's fields first (a model that
        exists, an activation and a layout that parse: models.check_network), then every value. A recipe is plain
        data: this builds no network (models.build_network builds and checks that)."""
        from ..models.build import check_network

        check_network(**self.network())
        return self.check_values()

    def check_values(self) -> "TrainConfig":
        """The values alone, against their choices and ranges (each field's metadata) and the augmentation's; return
        self. The network's fields are checked where it is built."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise TinyMnistError(f"unknown {f.name} {value!r} (choose from {', '.join(meta['choices'])})")
            if meta.get("ok") and not meta["ok"](value):
                raise TinyMnistError(f"{f.name} must be {meta['expected']}, got {value}")
        self.aug.validate()
        return self

    def network(self) -> dict[str, Any]:
        """The fields that say which network trains, as models.build_network takes them."""
        return {"model": self.model, "dropout": self.dropout, "layout": self.layout, "activation": self.activation,
                "bn_affine": self.bn_affine, "models_file": self.models_file}

    @property
    def user_model(self) -> bool:
        """The model is the user's own: a class of a models file, or one registered with register_model."""
        from ..models.model import is_user_model

        return is_user_model(self.model, self.models_file)

    def build_model(self):
        """The untrained network this recipe trains, unchecked: its model class, dropout, layout, activation and
        batch norm, or the user's class."""
        from ..models.build import create_network

        return create_network(**self.network())

    def recipe(self) -> dict[str, Any]:
        """The fields that make two runs the same recipe: every field but the seed and those a machine resolves
        ("auto" precision, memory format and kernels, see MACHINE_FIELDS)."""
        d = self.to_dict()
        for k in ("seed",) + MACHINE_FIELDS:
            d.pop(k)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aug"]["erase_area"] = list(self.aug.erase_area)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config saved by to_dict; unknown keys are an error."""
        d = dict(d)
        d.setdefault("memory_format", "contiguous")  # saved before the field existed: it trained contiguous
        d.setdefault("kernels", "native")  # likewise: PyTorch's batch norm
        aug = dict(d.pop("aug", {}))
        if "erase_area" in aug:
            aug["erase_area"] = tuple(aug["erase_area"])
        return override(cls(aug=_build(AugConfig, aug)), d)


def _build(cls, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TinyMnistError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
    return cls(**values)


def for_user_model(cfg: TrainConfig, model: str, models_file: str = "") -> TrainConfig:
    """`cfg`'s training recipe for a user's model: its class from `models_file` (or registered in this process);
    dropout, layout, activation and bn_affine, which only tinymnist's own models take, are cleared."""
    return dataclasses.replace(cfg, model=model, models_file=str(models_file), dropout=None, layout="", activation="",
                               bn_affine=True)


def override(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Return `cfg` with `values` replaced; `aug` may be a dict of AugConfig fields. Unknown keys are an error."""
    values = {k: v for k, v in values.items() if v is not None}  # None means "not given"
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TinyMnistError(f"unknown config key(s): {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
    if isinstance(values.get("aug"), dict):
        values["aug"] = _build(AugConfig, {**dataclasses.asdict(cfg.aug), **values["aug"]})
    return dataclasses.replace(cfg, **values)

