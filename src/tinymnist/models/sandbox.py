"""Strangers' code, run apart: a submission's models are loaded and built in a child process with limits, never in
the grader's own process.

A class body and an `__init__` are code, and a grader opens a whole class's files. Python cannot sandbox Python (any
module that imported `os`, torch among them, hands it back), so the walls are the operating system's, applied in
the child before it reads a line of the submission:
  - a temporary working directory, made the child's root (chroot) where the OS allows it, so no path outside it
    exists for the child; the submission's sources were read into memory before;
  - no network: a network namespace of its own, with no interface up (unshare), where the OS allows it;
  - no bytes written to any file (RLIMIT_FSIZE 0), a memory limit (RLIMIT_AS) and a CPU-time limit (RLIMIT_CPU),
    and a wall-clock limit that the parent enforces by killing the child;
  - its standard output and error go nowhere, so a print in a class body cannot garble the grader's table.
Inside, the definitions-only rule of notebook.py applies, with builtins that lack open, exec, eval, compile and
input, and an import that admits only ALLOWED_IMPORTS and the submission's own files; any other import is skipped
with one line. These builtins stop the casual, and the walls stop the rest.

The child streams one message per model as it goes, so a model that hangs costs only its own row: those built before
it are reported, and the parent names the one it was building when the time ran out."""

from __future__ import annotations

import builtins
import collections  # noqa: F401 - preloaded: after chroot nothing can be imported from disk
import ctypes
import dataclasses
import functools  # noqa: F401
import math  # noqa: F401
import multiprocessing as mp
import os
import resource
import shutil
import signal
import sys
import tempfile
import types
import typing  # noqa: F401
from pathlib import Path

import numpy  # noqa: F401
import torch
import torch.nn.functional  # noqa: F401
from torch import nn

from ..errors import TinyMnistError, one_line
from .model import needs_arguments
from .notebook import OwnModules, load_definitions
from .summary import summarize

# the packages a submission may import, besides its own files; every other import is skipped with one line
ALLOWED_IMPORTS = ("torch", "numpy", "math", "functools", "collections", "typing", "__future__")
_UNSAFE_BUILTINS = ("open", "exec", "eval", "compile", "input", "breakpoint", "help", "exit", "quit", "__import__")
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one submission's child may use."""

    seconds: float = 20.0  # wall clock for loading and building every model of the file
    memory_mb: int = 2048  # address space beyond what the child starts with (torch is already loaded)


@dataclasses.dataclass(frozen=True)
class Job:
    """One file of a submission to load: its chunks of code, (cell number or None, source), and the submission's own
    Python files as {path relative to the submission: source}, read by the parent."""

    label: str  # the file as rows name it (path relative to the class folder)
    chunks: tuple
    own: tuple  # ((relative path, source), ...)
    here: str  # the file's folder, relative to the submission: where `import model` looks first
    kind: str = "notebook"  # or "file"
    skip: tuple = ()  # classes not to build: measured already, or one that hung a child before


def load_in_child(job: Job, limits: Limits = Limits()) -> dict:
    """Load and build `job`'s models in a child process under `limits`; return {"models": [{name, params, macs, rf,
    rf_cell, rf_text, error}], "notes": [...], "failure": why or None, "isolation": [...]}. Never raises for the
    submission's sake: whatever it does is a failure or an error in the record. A class that hangs or kills its child
    gets its error and a new child (with the same limits) builds the classes after it."""
    record = _one_child(job, limits)
    while record.get("hung"):
        name = record.pop("hung")
        record["models"].append({"name": name, "params": None, "error": record.pop("failure")})
        done = tuple(m["name"] for m in record["models"])
        again = _one_child(dataclasses.replace(job, skip=job.skip + done), limits)
        record["models"] += again["models"]
        record["failure"] = again["failure"]
        record["notes"] += [n for n in again["notes"] if n not in record["notes"]]
        record["hung"] = again.get("hung")
    record.pop("hung", None)
    return record


def _one_child(job: Job, limits: Limits) -> dict:
    ctx = mp.get_context("forkserver")
    _preload(ctx)
    jail = tempfile.mkdtemp(prefix="tinymnist-grade-")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(sender, job, limits, jail), daemon=True)
    record: dict = {"models": [], "notes": [], "failure": None, "isolation": [], "hung": None}
    building = None
    try:
        child.start()
        sender.close()
        deadline = _now() + limits.seconds
        while True:
            left = deadline - _now()
            if left <= 0 or not receiver.poll(left):
                what = f"building {building}()" if building else "loading the file"
                record["failure"] = f"timed out after {limits.seconds:g} s while {what}"
                record["hung"] = building
                break
            try:
                kind, payload = receiver.recv()
            except (EOFError, OSError):
                what = f" while building {building}()" if building else ""
                record["failure"] = _death(child, what, limits)
                record["hung"] = building
                break
            if kind == "building":
                building = payload
            elif kind == "model":
                record["models"].append(payload)
                building = None
            elif kind == "note":
                record["notes"].append(payload)
            elif kind == "isolation":
                record["isolation"] = payload
            elif kind == "failed":
                record["failure"] = payload
                break
            elif kind == "done":
                break
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)
        shutil.rmtree(jail, ignore_errors=True)
    return record


def _now() -> float:
    import time

    return time.monotonic()


def _death(child, what: str, limits: Limits) -> str:
    child.join(5)
    code = child.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = {"SIGXCPU": "its CPU time ran out", "SIGKILL": "it was killed (out of memory?)",
               "SIGSEGV": "it crashed (segmentation fault)"}.get(name, f"it died of {name}")
        return f"stopped{what}: {why}"
    return f"the child process ended{what} (exit status {code}) without a result; memory limit {limits.memory_mb} MB"


_PRELOADED = False


def _preload(ctx) -> None:
    """The fork server imports torch and this module once; every child forks from it in milliseconds."""
    global _PRELOADED
    if not _PRELOADED:
        ctx.set_forkserver_preload(["__main__", __name__])
        _PRELOADED = True


# ---------------------------------------------------------------- in the child


def _child(conn, job: Job, limits: Limits, jail: str) -> None:
    def send(kind: str, payload=None) -> None:
        conn.send((kind, payload))

    try:
        send("isolation", _isolate(jail, limits))
        module, own = _module(job, send)
        classes = _classes(module, own)
        if not classes:
            send("failed", "no usable model: no nn.Module class whose constructor needs no argument")
            return
        for name, cls in classes:
            if name in job.skip:
                continue
            send("building", name)
            send("model", _measure(name, cls))
        send("done")
    except TinyMnistError as e:
        send("failed", str(e))
    except BaseException as e:  # noqa: BLE001 - the submission may raise anything, SystemExit included
        send("failed", one_line(e))
    finally:
        conn.close()


def _isolate(jail: str, limits: Limits) -> list[str]:
    """The walls, in the child, before any of the submission runs; returns what held, in words."""
    held = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    torch.set_num_threads(1)
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWNET | _CLONE_NEWUSER  # a user namespace lends the caps
    if libc.unshare(flags) == 0:
        held.append("no network")
    os.chdir(jail)
    try:
        os.chroot(jail)
        os.chdir("/")
        held.append("an empty root")
    except OSError:  # no chroot here: at least no new process (os.system) may start
        held.append("a temporary directory")
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with an error instead of killing the child
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    cpu = int(limits.seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    base = _address_space()
    if base:
        cap = base + limits.memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    held += ["no file writes", f"{limits.memory_mb} MB", f"{limits.seconds:g} s"]
    return held


def confine_worker(memory_mb: int = 2048) -> list[str]:
    """The walls for a worker that trains a stranger's network (parallel.run_jobs(confine=...)): no network and a
    memory limit. It reads MNIST (already on disk: the grader fetches it first) and writes its run directory, so it
    keeps the filesystem."""
    held = []
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWNET | _CLONE_NEWUSER
    if libc.unshare(flags) == 0:
        held.append("no network")
    base = _address_space()
    if base:
        cap = base + memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        held.append(f"{memory_mb} MB")
    return held


def _address_space() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def safe_builtins(importer) -> dict:
    """The builtins a submission's code sees: without the unsafe ones, and with `importer` as __import__."""
    allowed = {k: v for k, v in vars(builtins).items() if k not in _UNSAFE_BUILTINS}
    allowed["__import__"] = importer
    return allowed


def _module(job: Job, send) -> tuple[types.ModuleType, OwnModules]:
    """The submission's file, loaded by the definitions-only rule into a module of its own, with its own modules."""
    real_import = builtins.__import__
    note = (lambda line: send("note", line))

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split(".")[0]
        if level == 0 and top not in ALLOWED_IMPORTS and not own.knows(name):
            raise ImportError(f"{name} is not on the grader's allowlist")
        return real_import(name, globals, locals, fromlist, level)

    safe = safe_builtins(guarded)
    own = OwnModules(dict(job.own), job.here, builtins=safe, log=note)  # the disk is out of reach after chroot
    sys.meta_path.insert(0, own)  # this child grades one file: its modules may stay
    module = types.ModuleType("submission")
    module.__dict__["__builtins__"] = safe
    sys.modules["submission"] = module
    load_definitions(Path(job.label), list(job.chunks), module, log=note, kind=job.kind)
    return module, own


def _classes(module: types.ModuleType, own: OwnModules) -> list[tuple[str, type]]:
    """The nn.Module classes whose constructor needs no argument that the file defines, or imports from the
    submission's own files, in the order the file names them."""
    found = []
    for attr, obj in list(vars(module).items()):
        if isinstance(obj, type) and issubclass(obj, nn.Module) and not needs_arguments(obj) \
                and (obj.__module__ == module.__name__ or own.knows(obj.__module__)):
            found.append((attr, obj))
    return found


def _measure(name: str, cls: type) -> dict:
    """One model as the class table shows it: parameters, MACs and receptive field, or the error that stopped it."""
    try:
        model = cls()
        params = sum(p.numel() for p in model.parameters())
        s = summarize(model)
        out = model.eval()(torch.zeros(2, 1, 28, 28))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 10):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return {"name": name, "params": params, "error": f"forward gives {shape} for a (2, 1, 28, 28) batch"}
        return {"name": name, "params": params, "macs": s.macs, "rf": s.rf, "rf_cell": s.rf_cell,
                "rf_text": s.rf_text, "error": None}
    except BaseException as e:  # noqa: BLE001
        return {"name": name, "params": None, "error": f"{name}() fails: {one_line(e)}"}


