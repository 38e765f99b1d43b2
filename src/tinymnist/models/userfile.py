"""A user's own models file: a plain Python file of nn.Module classes (--models FILE.py), loaded and checked. (Classes
registered in this process with @register_model live in model.py's registry.)

A models file is written the way students of this assignment write their model.py: classes Model_1, Model_2, ...
whose forward maps (N, 1, 28, 28) to (N, 10), logits or log-probabilities (cross-entropy of log_softmax outputs
equals cross-entropy of the logits, since log_softmax of log-probabilities changes nothing). No tinymnist import
is needed. Code runs only from a file the user names: a checkpoint records the file's path, SHA-256 and class, and
loading it takes the same --models FILE.py again; tinymnist never imports a path it read from a checkpoint."""

from __future__ import annotations

import hashlib
import inspect
import multiprocessing as mp
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import TinyMnistError, one_line
from .model import needs_arguments
from .notebook import NotebookReport, OwnModules, load_notebook, load_source, where

_FILES: dict[str, "ModelsFile"] = {}  # sha256 -> the file's classes, each file imported once per process


@dataclass(frozen=True)
class ModelsFile:
    """What a models file offers: its usable classes by name, and the classes it skipped with the reason."""

    path: Path
    sha256: str
    classes: dict = field(default_factory=dict)  # name -> class, in the order the file defines them
    skipped: dict = field(default_factory=dict)  # name -> why it cannot be built without arguments
    notebook: Optional[NotebookReport] = None  # what was taken from the notebook or file, and what was left unrun

    def choices(self) -> str:
        """The valid names, and those skipped with why: what an error about a name lists."""
        skipped = f"; skipped: {', '.join(f'{k} ({v})' for k, v in self.skipped.items())}" if self.skipped else ""
        return f"choose from {', '.join(self.classes)}{skipped}"

    def get(self, name: str) -> type:
        if name not in self.classes:
            raise TinyMnistError(f"{self.path} has no model {name!r} ({self.choices()})")
        return self.classes[name]

    def build(self, name: str) -> nn.Module:
        """A new instance of class `name`; a constructor that raises (a name a skipped import would have defined,
        a wrong shape) is one TinyMnistError naming the file's line, or the notebook's cell and line."""
        cls = self.get(name)
        try:
            return cls()
        except Exception as e:  # noqa: BLE001 - the user's constructor may raise anything
            raise TinyMnistError(f"{self.path}: {name}() fails{_location(e, self.path)}: {one_line(e)}") from None


def _location(e: BaseException, path: Path) -> str:
    """' at cell N, line L' or ' at line L': the innermost frame of the user's file in the traceback of `e`."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        cell = where(frame.filename, frame.lineno)
        if cell:
            return f" at {cell}"
        if Path(frame.filename) == path:
            return f" at line {frame.lineno}"
    return ""


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_models_file(path: str | Path) -> ModelsFile:
    """Import a models file (once per content) and collect its nn.Module classes; every problem is one
    TinyMnistError naming the file (and the line, when the import fails)."""
    path = Path(path)
    try:
        source = path.read_bytes()
    except FileNotFoundError:
        raise TinyMnistError(f"{path}: models file not found") from None
    except OSError as e:
        raise TinyMnistError(f"{path}: cannot read the models file ({e.strerror or e})") from None
    digest = hashlib.sha256(source).hexdigest()
    if digest in _FILES:
        return _FILES[digest]
    name = f"tinymnist_user_models_{digest[:16]}"
    if path.suffix == ".ipynb":  # a notebook's code cells, and a models file, are read for definitions only
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module
        try:
            with _own(path) as own:  # `from model import Net` finds the model.py beside it
                report = load_notebook(path, source, module, log=_note if mp.parent_process() is None else None)
        except BaseException:
            del sys.modules[name]
            raise
        return _collect(path, digest, module, report, own)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # classes that pickle, dataclasses and typing look up by module
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        del sys.modules[name]
        raise TinyMnistError(f"{path}: not a Python file (not UTF-8 text)") from None
    try:
        with _own(path) as own:
            report = load_source(path, text, module, log=_note if mp.parent_process() is None else None)
    except BaseException:
        del sys.modules[name]
        raise
    return _collect(path, digest, module, report, own)


def _own(path: Path) -> OwnModules:
    """The file's own modules: beside it first, then one folder up (a notebook in notebooks/ importing the package
    at its repository's top), found on disk by name, read by the definitions-only rule."""
    path = path.resolve()
    return OwnModules(here=path.parent.name, root=path.parent.parent)


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _collect(path: Path, digest: str, module: types.ModuleType, report: Optional[NotebookReport] = None,
             own: Optional[OwnModules] = None) -> ModelsFile:
    """The usable nn.Module classes the file (or notebook) defines, or imports from its own modules beside it, and
    those it skipped with why."""
    classes, skipped = {}, {}
    for attr, obj in vars(module).items():
        if not (inspect.isclass(obj) and issubclass(obj, nn.Module)
                and (obj.__module__ == module.__name__ or (own is not None and own.knows(obj.__module__)))):
            continue
        why = needs_arguments(obj)
        if why:
            skipped[attr] = why
        else:
            classes[attr] = obj
    if not classes:
        detail = f" (skipped: {', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        raise TinyMnistError(f"{path}: no usable model: no nn.Module class whose constructor needs no argument{detail}")
    found = ModelsFile(path, digest, classes, skipped, report)
    _FILES[digest] = found
    return found


def check_forward(model: nn.Module, name: str, where: str = "") -> None:
    """One small batch through the model in eval mode: an error, or an output that is not (N, 10), is one
    TinyMnistError naming the model."""
    label = f"{where}: {name}" if where else name
    was = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise TinyMnistError(f"{label} has no parameters to train") from None
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, 1, 28, 28, device=device))
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise TinyMnistError(f"{label}: forward fails on a (2, 1, 28, 28) batch: {one_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 10):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TinyMnistError(f"{label}: forward gives {shape} for a (2, 1, 28, 28) batch, expected (2, 10): "
                             "one score (logit or log-probability) per digit")
