"""A search space: the TOML file of a sweep, parsed into a frozen Space. No Optuna here: the report reads spaces,
and a sweep's parent parses the file once and hands the Space to its workers.

A space names a base step, [fixed] and [search] recipe fields (aug.<field> for augmentation), the seeds each trial
trains, the inclusive parameter budget max_params, the rule's window `last`, the [pruner]'s warm-up, and the
objective each trial is judged by (see OBJECTIVES)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.config import AugConfig, TrainConfig
from ..errors import TinyMnistError
from ..target import LAST, MAX_EPOCHS, MAX_PARAMS

DEFAULT_VAL = 10000  # held-out training images when the space does not say
HEARTBEAT = 60  # seconds between a running trial's heartbeats; a trial silent for 2 of them is failed and retried
# where a reader finds the format of a space file: the help of `tinymnist sweep` and the docs say the same
SPACE_FORMAT = "base step, [fixed], [search], seeds, max_params, objective (format: docs/searches.md)"
# How a trial's seeds become one number, on validation. "worst": the rule itself, the lowest accuracy of the last
# epochs, the minimum over seeds (the first frontier searches). "mean": the mean over seeds and over the last epochs,
# which the seeds' noise moves less; the worst is still recorded beside it.
OBJECTIVES = ("worst", "mean")


@dataclass(frozen=True)
class Param:
    """One searched recipe field: a range (low, high, log) or a list of choices."""

    name: str  # a TrainConfig field, or aug.<field>
    low: Any = None
    high: Any = None
    log: bool = False
    choices: Optional[tuple] = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class Space:
    """A sweep: the base step, fixed and searched recipe fields, seeds per trial, and the parameter budget."""

    step: str
    fixed: dict
    search: tuple[Param, ...]
    seeds: tuple[int, ...] = (0,)
    max_params: int = MAX_PARAMS  # inclusive
    last: int = LAST  # the rule's window: the last `last` epochs
    startup_trials: int = 5  # the pruner compares a trial with the median only after this many finished
    warmup_epochs: int = 5  # and only from this epoch of a seed on
    epochs: int = 15  # per seed, fixed for the whole study (searching it is refused), so the pruner's steps line up
    objective: str = "worst"  # one of OBJECTIVES

    def config(self, values: dict) -> TrainConfig:
        """The base step's recipe with the fixed fields and `values` (flat names, aug.x for augmentation)."""
        from .check import check_recipe
        from .series import get_step

        merged = nest_fields({**self.fixed, **values})
        return check_recipe(get_step(self.step), merged.pop("model", None), merged.pop("models_file", None) or None,
                            merged).validate()

    def key(self) -> str:
        """What a study records of its space, to refuse a changed space under its name. The fields added since the
        first studies (epochs, derived; objective, at its first value) leave the key of an older space as it was."""
        d = dataclasses.asdict(self)
        d.pop("epochs")
        if d["objective"] == OBJECTIVES[0]:
            d.pop("objective")
        return repr(d)


_SPACE_KEYS = {"step", "fixed", "search", "seeds", "max_params", "last", "pruner", "objective"}


def flatten_fields(table: dict, prefix: str = "") -> dict:
    """{"aug": {"rotate": 5}} -> {"aug.rotate": 5}; a range table ({low, high}) stays one value."""
    flat = {}
    for k, v in table.items():
        if isinstance(v, dict) and not ({"low", "high"} & set(v)):
            flat.update(flatten_fields(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def nest_fields(flat: dict) -> dict:
    """{"aug.rotate": 5} -> {"aug": {"rotate": 5}}: flat recipe names as override() takes them."""
    out: dict = {}
    for k, v in flat.items():
        if k.startswith("aug."):
            out.setdefault("aug", {})[k[4:]] = tuple(v) if isinstance(v, list) else v
        else:
            out[k] = v
    return out


def check_field(name: str, where: str) -> None:
    """A flat recipe name (a TrainConfig field or aug.<field>), or one TinyMnistError listing the valid ones."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"aug"}
    aug = {f"aug.{f.name}" for f in dataclasses.fields(AugConfig)}
    if name not in fields | aug:
        raise TinyMnistError(f"{where}: unknown recipe field {name!r} (valid: {', '.join(sorted(fields | aug))})")


def parse_space(data: dict, where: str = "space") -> Space:
    """Build a Space from a parsed TOML table; every mistake is one TinyMnistError naming the key."""
    from .series import get_step, step_names

    unknown = sorted(set(data) - _SPACE_KEYS)
    if unknown:
        raise TinyMnistError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(_SPACE_KEYS))})")
    step = data.get("step", step_names()[-1])
    get_step(step)
    fixed = flatten_fields(data.get("fixed", {}))
    for name in fixed:
        check_field(name, f"{where} [fixed]")
    search = []
    for name, spec in flatten_fields(data.get("search", {})).items():
        check_field(name, f"{where} [search]")
        if name == "epochs":
            raise TinyMnistError(f"{where}: epochs cannot be searched (the pruner compares trials epoch by epoch, "
                                 f"and the rule allows at most {MAX_EPOCHS}); fix it in [fixed]")
        if name in fixed:
            raise TinyMnistError(f"{where}: {name!r} is both fixed and searched")
        if isinstance(spec, list):
            if not spec:
                raise TinyMnistError(f"{where} [search] {name}: empty list of choices")
            search.append(Param(name, choices=tuple(spec)))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log"}:
            lo, hi = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise TinyMnistError(f"{where} [search] {name}: needs numbers low < high, got {lo!r}, {hi!r}")
            if spec.get("log") and lo <= 0:
                raise TinyMnistError(f"{where} [search] {name}: a log range needs low > 0")
            search.append(Param(name, lo, hi, bool(spec.get("log", False))))
        else:
            raise TinyMnistError(f"{where} [search] {name}: expected a list of choices or {{low, high, log}}")
    seeds = data.get("seeds", 1)
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise TinyMnistError(f"{where}: seeds must be a positive count or a list of seeds")
    pruner = data.get("pruner", {})
    if set(pruner) - {"startup_trials", "warmup_epochs"}:
        raise TinyMnistError(f"{where} [pruner]: valid keys are startup_trials and warmup_epochs")
    objective = data.get("objective", OBJECTIVES[0])
    if objective not in OBJECTIVES:
        raise TinyMnistError(f"{where}: objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    fixed.setdefault("val", DEFAULT_VAL)
    if not fixed["val"] and "val" not in {p.name for p in search}:
        raise TinyMnistError(f"{where}: a sweep chooses on validation, so val must be > 0")
    space = Space(step, fixed, tuple(search), seeds, int(data.get("max_params", MAX_PARAMS)),
                  int(data.get("last", LAST)), int(pruner.get("startup_trials", 5)),
                  int(pruner.get("warmup_epochs", 5)), objective=objective)
    # the fixed fields and one value of each searched one must make a recipe: the epochs every trial trains
    epochs = space.config({p.name: (p.choices[0] if p.choices else p.low) for p in search}).epochs
    space = dataclasses.replace(space, epochs=epochs)
    if space.last > space.epochs:
        raise TinyMnistError(f"{where}: last = {space.last} is more than the {space.epochs} epochs")
    return space


def read_space(path: str | Path) -> dict:
    """The raw TOML table of a space file."""
    from ..fileio import read_toml

    return read_toml(path)


def load_space(path: str | Path) -> Space:
    """Read and check a sweep's TOML space file."""
    return parse_space(read_space(path), str(path))
