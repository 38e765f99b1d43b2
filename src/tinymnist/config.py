"""Frozen training configs. Every field is saved with every result and checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import TinyMnistError

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


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe: model, optimisation, schedule and augmentation."""

    model: str = "Model_1"  # registry name of the model class
    layout: str = ""  # a network in the layout grammar of model.py, replacing the model's own; "" keeps it
    epochs: int = 15  # full passes over the 60,000 training images
    batch_size: int = 128  # training batch size
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.01  # base LR; the peak LR under onecycle
    momentum: float = 0.9  # SGD momentum (ignored by Adam/AdamW)
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float = 0.0  # L2 (SGD, Adam) or decoupled (AdamW) weight decay
    scheduler: str = "none"  # one of SCHEDULERS; onecycle steps every batch, step every epoch
    step_size: int = 5  # StepLR: epochs between LR drops
    gamma: float = 0.1  # StepLR: factor of each drop
    pct_start: float = 0.25  # OneCycleLR: fraction of the steps spent warming up
    div_factor: float = 10.0  # OneCycleLR: initial LR = lr / div_factor
    final_div_factor: float = 100.0  # OneCycleLR: final LR = initial LR / final_div_factor
    dropout: Optional[float] = None  # dropout after each conv block; None keeps the model's own default
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ema: float = 0.0  # decay of a moving average of the weights (and BN statistics) that is evaluated and saved
    # instead of the raw weights; it smooths out the epoch-to-epoch noise of SGD. 0 = off.
    aug: AugConfig = field(default_factory=AugConfig)  # training-time augmentation
    precision: str = "fp32"  # "bf16" autocasts forward passes to bfloat16; "auto" picks it only where the hardware
    # has it natively (AMX or AVX-512 BF16, CUDA 8.0+); a run records what it resolved to. See device.py
    memory_format: str = "auto"  # "channels_last", "contiguous", or "auto": the rule in device.py; recorded resolved
    kernels: str = "auto"  # "fused": batch norm + ReLU and max pool on the C kernels of kernels.py; "native": PyTorch's;
    # "auto": fused where they apply (CPU, fp32, channels_last) and build. Recorded resolved
    seed: int = 0  # seeds every RNG: init, batch order, augmentation
    eval_batch_size: int = 2000  # evaluation batch size (no gradients, so large is cheap)
    limit_batches: int = 0  # train/eval at most this many batches per epoch (0 = all); for smoke tests
    val: int = 0  # hold out this many training images (class-stratified, fixed split) as a validation set; 0 = none
    models_file: str = ""  # a user's Python file of nn.Module classes (--models); `model` then names a class in it

    def validate(self) -> "TrainConfig":
        """Raise TinyMnistError on a value that cannot train; return self."""
        from .model import list_models  # avoid an import cycle at module load

        if self.user_model:
            if self.dropout is not None or self.layout:
                raise TinyMnistError(f"{self.model} is your own model: dropout and layout apply to tinymnist's "
                                     "models only")
        elif self.model not in list_models():
            raise TinyMnistError(f"unknown model {self.model!r} (choose from {', '.join(list_models())})")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})"),
            (self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r} (choose from {', '.join(SCHEDULERS)})"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.step_size >= 1, f"step_size must be >= 1, got {self.step_size}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (0 < self.pct_start < 1, f"pct_start must be in (0, 1), got {self.pct_start}"),
            (self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.precision in ("fp32", "bf16", "auto"),
             f"unknown precision {self.precision!r} (choose from fp32, bf16, auto)"),
            (self.memory_format in ("auto", "contiguous", "channels_last"),
             f"unknown memory_format {self.memory_format!r} (choose from auto, contiguous, channels_last)"),
            (self.kernels in ("auto", "fused", "native"),
             f"unknown kernels {self.kernels!r} (choose from auto, fused, native)"),
            (0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}"),
            (self.limit_batches >= 0, f"limit_batches must be >= 0, got {self.limit_batches}"),
            (0 <= self.val < 60000, f"val must be in [0, 60000), got {self.val}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TinyMnistError(msg)
        self.aug.validate()
        if self.layout:
            self.build_model().check_shapes()
        elif self.user_model:
            from .usermodels import check_forward

            check_forward(self.build_model(), self.model, self.models_file)
        return self

    @property
    def user_model(self) -> bool:
        """The model is the user's own: a class of a models file, or one registered with register_model."""
        from .model import list_builtin_models
        from .usermodels import registered_class

        return bool(self.models_file) or (self.model not in list_builtin_models()
                                          and registered_class(self.model) is not None)

    def build_model(self):
        """The untrained network this recipe trains: its model class, dropout and layout, or the user's class."""
        from .model import create_model

        if self.models_file:
            from .usermodels import load_models_file

            return load_models_file(self.models_file).get(self.model)()
        return create_model(self.model, dropout=self.dropout, layout=self.layout)

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
    dropout and layout, which only tinymnist's own models take, are cleared."""
    return dataclasses.replace(cfg, model=model, models_file=str(models_file), dropout=None, layout="")


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

