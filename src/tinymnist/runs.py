"""Run directories: config.json, history.json, model.pt and curves.png, each written atomically."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__
from .config import TrainConfig
from .data import MNIST, VAL_SEED, load_mnist, split_fingerprint, validation_split
from .device import configure_threads, hardware, pick_device
from .engine import fit, resolve_for
from .errors import TinyMnistError
from .fileio import atomic_path, write_json
from .kernels import OPS as KERNEL_OPS
from .model import Net, count_params, model_class
from .plots import plot_curves

CHECKPOINT_FORMAT = "tinymnist-checkpoint-v1"


def new_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """runs/<name>-<timestamp>/, with a numeric suffix if that already exists."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _git(*args: str) -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> Optional[str]:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> Optional[bool]:
    """Whether tracked files differ from the commit: then the commit alone does not say what code ran."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def environment(device: torch.device) -> dict:
    """What produced a result: versions, device, threads and the hardware as the machine reports it."""
    return {
        "tinymnist": __version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "hardware": hardware(device),
        "kernel_ops": list(KERNEL_OPS),  # what kernels="fused" runs in C, in this version
    }



def save_checkpoint(path: Path, model: Net, cfg: TrainConfig) -> None:
    """state_dict plus its config, loadable with torch.load(..., weights_only=True)."""
    payload = {"format": CHECKPOINT_FORMAT, "model": cfg.model, "config": cfg.to_dict(),
               "params": count_params(model), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Net, TrainConfig]:
    """Rebuild the model a run saved, in eval mode; a file that is not a tinymnist checkpoint is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise TinyMnistError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
        raise TinyMnistError(f"{path}: not a tinymnist checkpoint ({e.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TinyMnistError(f"{path}: not a tinymnist checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise TinyMnistError(f"{path}: damaged tinymnist checkpoint (no recipe or no weights)")
    try:
        cfg = TrainConfig.from_dict(payload["config"])
    except TinyMnistError as e:
        raise TinyMnistError(f"{path}: its recipe is not valid here: {e}") from None
    except (TypeError, ValueError) as e:
        raise TinyMnistError(f"{path}: damaged recipe ({e.__class__.__name__})") from None
    model = cfg.build_model()
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise TinyMnistError(f"{path}: weights do not fit {cfg.model}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg


def train_run(cfg: TrainConfig, out: Optional[str | os.PathLike] = None, data_dir: Optional[str] = None,
              device: str = "auto", name: Optional[str] = None, progress: Optional[bool] = None,
              verbose: bool = True, threads: int = 0, data: Optional[MNIST] = None,
              on_epoch: Optional[Callable[[dict], None]] = None) -> tuple[Path, list[dict]]:
    """Train `cfg` and write its run directory; return the directory and the history.

    `data` (already on the device) skips loading; `on_epoch` sees each record after history.json holds it, and
    may raise to stop the run (a sweep's pruner does): the epochs done stay on disk."""
    cfg.validate()
    if cfg.dropout is None:  # record the dropout actually used, not "model default"
        cfg = replace(cfg, dropout=model_class(cfg.model).default_dropout)
    dev = pick_device(device)
    configure_threads(threads)
    env = environment(dev)
    cfg = resolve_for(cfg, dev, env["hardware"])
    if data is None:
        data = load_mnist(data_dir, device=dev, progress=progress is not False)
    run_dir = Path(out) if out else new_run_dir(name or cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = count_params(cfg.build_model())
    meta = {"name": name or cfg.model, "model": cfg.model, "params": params, "seed": cfg.seed,
            "config": cfg.to_dict(), "env": env,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    if cfg.val:
        _, held = validation_split(data.train_labels, cfg.val)
        meta["val_split"] = {"images": cfg.val, "seed": VAL_SEED, "stratified": True,
                             "fingerprint": split_fingerprint(held)}
    write_json(run_dir / "config.json", meta)
    if verbose:
        print(f"{meta['name']}: {cfg.model}, {params:,} parameters, {cfg.epochs} epochs on {dev}; writing {run_dir}")
    history: list[dict] = []

    def record_epoch(record: dict, _model: Net) -> None:
        history.append(record)
        write_json(run_dir / "history.json", history)  # rewritten each epoch: a crash keeps the epochs done
        if on_epoch is not None:
            on_epoch(record)

    model, history_out = fit(cfg, data, on_epoch=record_epoch, progress=progress, verbose=verbose)
    save_checkpoint(run_dir / "model.pt", model, cfg)
    plot_curves(history_out, run_dir / "curves.png", title=f"{meta['name']} ({cfg.model}, {params:,} params)")
    return run_dir, history_out


def train_job(config: dict, run_dir: str, name: str, data_dir: Optional[str], device: str, threads: int) -> dict:
    """Train a recipe (as a to_dict() dict) into `run_dir`, quietly; module-level, so a worker process can run it."""
    cfg = TrainConfig.from_dict(config)
    _, history = train_run(cfg, out=run_dir, data_dir=data_dir, device=device, name=name, progress=False,
                           verbose=False, threads=threads)
    return {"seed": cfg.seed, "history": history, "run_dir": run_dir}
