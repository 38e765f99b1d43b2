"""Run directories: config.json, history.json, model.pt and curves.png, each written atomically, and resume.pt,
the state a stopped run continues from."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..version import __version__
from .config import TrainConfig
from .data import MNIST, load_mnist, resolve_data_dir
from ..accel.device import configure_threads, hardware, pick_device
from .engine import Trainer
from .plan import make_plan, models_file_record
from ..errors import TinyMnistError, first_line
from ..fileio import atomic_path, read_json, write_json
from ..accel.kernels import OPS as KERNEL_OPS
from ..models.model import count_params
from .curves import plot_curves

CHECKPOINT_FORMAT = "tinymnist-checkpoint-v1"
STATE_FILE = "resume.pt"  # what a stopped run needs to continue: written after every epoch but the last
STATE_FORMAT = "tinymnist-resume-v1"
TEACHER_FILE = "teacher.json"  # a distilled run's teacher: its step, recipe, epochs and history
# what `tinymnist errors` writes beside a checkpoint: every misclassified test image, their grid, the confusion matrix
ERRORS_FILE, GRID_FILE, CONFUSION_FILE = "errors.json", "misclassified.png", "confusion.png"


def new_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """runs/<name>-<timestamp>/, with a numeric suffix if that already exists."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


_HERE = Path(__file__).resolve().parent


def _git(*args: str, cwd: Path = _HERE) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit(cwd: Path = _HERE) -> Optional[str]:
    return _git("rev-parse", "HEAD", cwd=cwd) or None


def _git_dirty(cwd: Path = _HERE) -> Optional[bool]:
    """Whether tracked files differ from the commit: then the commit alone does not say what code ran. None outside
    a git checkout (an installed wheel)."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return None if status is None else bool(status)


def environment(device: torch.device, facts: Optional[dict] = None) -> dict:
    """What produced a result: versions, device, threads and the hardware as the machine reports it (`facts`, when
    a plan has read them already)."""
    return {
        "tinymnist": __version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "hardware": facts if facts is not None else hardware(device),
        "kernel_ops": list(KERNEL_OPS),  # what kernels="fused" runs in C, in this version
    }



def save_checkpoint(path: Path, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """state_dict plus its config, loadable with torch.load(..., weights_only=True). A model of a user's models
    file also records the file's path, SHA-256 and class: what to name again, never code to run."""
    payload = {"format": CHECKPOINT_FORMAT, "model": cfg.model, "config": cfg.to_dict(),
               "params": count_params(model), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if cfg.models_file:
        payload["models_file"] = models_file_record(cfg)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _user_recipe(path: Path, payload: dict, cfg: TrainConfig, models: Optional[str],
                 changed: str = "warn") -> TrainConfig:
    """The recipe of a checkpoint (or a run) of a user's model, with the models file the user names now (the path it
    saved is only reported): tinymnist never imports a path it read from a file. A file whose hash differs loads
    after one warning line naming both hashes (changed="warn"), or is refused in one line (changed="refuse": a run
    that resumes must train the same code to continue the same history)."""
    saved = payload.get("models_file") if isinstance(payload.get("models_file"), dict) else {}
    what = "checkpoint" if changed == "warn" else "run"
    if not cfg.models_file:
        if models:
            raise TinyMnistError(f"{path} holds tinymnist's {cfg.model}, not a model of a models file: drop --models")
        return cfg
    if not models:
        raise TinyMnistError(f"{path} holds {cfg.model} from your models file {saved.get('path', cfg.models_file)}: "
                             f"name it with --models FILE.py (tinymnist never imports a path read from a {what})")
    from ..models.userfile import load_models_file

    found = load_models_file(models)
    if saved.get("sha256") and saved["sha256"] != found.sha256:
        text = (f"{models} has SHA-256 {found.sha256[:16]}…, but {path} was trained with {saved['sha256'][:16]}… "
                f"({saved.get('path', '?')})")
        if changed != "warn":
            raise TinyMnistError(f"{text}: a resumed run must train the same code; restore that file")
        print(f"tinymnist: warning: {text}; loading anyway", file=sys.stderr, flush=True)
    return replace(cfg, models_file=str(models))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    models: Optional[str] = None) -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild the model a run saved, in eval mode; a file that is not a tinymnist checkpoint is a clear error.
    A checkpoint of a user's model needs `models`, the models file, named again."""
    path = Path(path)
    if not path.is_file():
        raise TinyMnistError(f"{path}: checkpoint not found")
    payload = _load_marked(path, CHECKPOINT_FORMAT, "checkpoint")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise TinyMnistError(f"{path}: damaged tinymnist checkpoint (no recipe or no weights)")
    try:
        cfg = TrainConfig.from_dict(payload["config"])
    except TinyMnistError as e:
        raise TinyMnistError(f"{path}: its recipe is not valid here: {e}") from None
    except (TypeError, ValueError) as e:
        raise TinyMnistError(f"{path}: damaged recipe ({e.__class__.__name__})") from None
    cfg = _user_recipe(path, payload, cfg, models)
    model = cfg.build_model()
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise TinyMnistError(f"{path}: weights do not fit {cfg.model}: {first_line(e)}") from None
    return model.to(device).eval(), cfg


def train_run(cfg: TrainConfig, out: Optional[str | os.PathLike] = None, data_dir: Optional[str] = None,
              device: str = "auto", name: Optional[str] = None, progress: Optional[bool] = None,
              verbose: bool = True, threads: int = 0, data: Optional[MNIST] = None,
              on_epoch: Optional[Callable[[dict], None]] = None, until: Optional[int] = None,
              teacher: Optional[TrainConfig] = None) -> tuple[Path, list[dict]]:
    """Train `cfg` and write its run directory; return the directory and the history.

    `data` (already on the device) skips loading; `on_epoch` sees each record after history.json holds it, and
    may raise to stop the run (a sweep's pruner does): the epochs done stay on disk, with the state to resume
    them. `until` stops after that many epochs (resume_run continues). `teacher`: a distilled recipe's teacher's recipe."""
    dev = pick_device(device)
    configure_threads(threads)
    if data is None:
        data = load_mnist(data_dir, device=dev, progress=progress is not False)
    facts = hardware(dev)  # read once: the plan resolves with it, and the run records it
    env = environment(dev, facts)
    run_dir = Path(out) if out else new_run_dir(name or cfg.model)  # named now, made once the plan stands
    plan = make_plan(cfg, data, teacher=teacher, warn=True, facts=facts)
    trainer = Trainer(plan)  # before the directory: a recipe the trainer refuses leaves no run behind
    meta = {"name": name or cfg.model, **plan.record, "env": env,
            "kernels_applied": plan.kernels_applied,  # what trains in C
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    if plan.models_file is not None:
        meta["models_file"] = plan.models_file  # what resume needs named again, and checks
    if plan.split is not None:
        meta["val_split"] = plan.split.record
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", meta)
    if verbose:
        print(f"{meta['name']}: {plan.cfg.model}, {meta['params']:,} parameters, {plan.cfg.epochs} epochs on {dev}; "
              f"writing {run_dir}")
    return run_dir, _advance(run_dir, meta, trainer, until, progress, verbose, on_epoch)


def resume_run(run_dir: str | os.PathLike, data_dir: Optional[str] = None, progress: Optional[bool] = None,
               verbose: bool = True, threads: int = 0, data: Optional[MNIST] = None, until: Optional[int] = None,
               expect_epoch: Optional[int] = None, models: Optional[str] = None) -> tuple[Path, list[dict]]:
    """Continue a stopped run from its last finished epoch, on the device it trained on; return its history.

    threads=0 uses the thread count the run recorded (a history depends on it). expect_epoch: fail unless the
    saved state is after exactly that many epochs. A run of a user's model needs `models`, its models file named
    again, unchanged (as a checkpoint does): nothing is imported from a path the run recorded."""
    run_dir = Path(run_dir)
    meta, cfg = _read_meta(run_dir)
    cfg = _user_recipe(run_dir, meta, cfg, models, changed="refuse")
    state = _read_state(run_dir, meta)
    if expect_epoch is not None and state["epoch"] != expect_epoch:
        raise TinyMnistError(f"{run_dir}: its saved state is after epoch {state['epoch']}, expected {expect_epoch}")
    dev = pick_device(str(meta["env"].get("device", "cpu")).split(":")[0])
    configure_threads(threads or int(meta["env"].get("threads") or 0))
    if data is None:
        data = load_mnist(data_dir, device=dev, progress=progress is not False)
    teacher = TrainConfig.from_dict(state["teacher"]["config"]) if state.get("teacher") else None
    trainer = Trainer(make_plan(cfg, data, teacher=teacher))
    trainer.load_state_dict(state)
    if verbose:
        print(f"{meta['name']}: resuming {cfg.model} after epoch {state['epoch']} of {cfg.epochs}; writing {run_dir}")
    return run_dir, _advance(run_dir, meta, trainer, until, progress, verbose, None)


def _read_meta(run_dir: Path) -> tuple[dict, TrainConfig]:
    try:
        meta = read_json(run_dir / "config.json")
        cfg = TrainConfig.from_dict(meta["config"])
    except FileNotFoundError:
        raise TinyMnistError(f"{run_dir}: not a run directory (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError, TinyMnistError) as e:
        raise TinyMnistError(f"{run_dir}/config.json: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta.get("env"), dict):
        raise TinyMnistError(f"{run_dir}/config.json: no environment recorded")
    return meta, cfg


def _load_marked(path: Path, marker: str, what: str) -> dict:
    """A file torch.save wrote for us, loaded as weights only, and held to its format marker: anything else is one
    clear line ("not a tinymnist checkpoint", "... resume state"), never a traceback."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a file of ours we can read"
        raise TinyMnistError(f"{path}: not a tinymnist {what} ({e.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != marker:
        raise TinyMnistError(f"{path}: not a tinymnist {what} (no '{marker}' marker)")
    return payload


def _read_state(run_dir: Path, meta: dict) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        if (run_dir / "model.pt").is_file():
            raise TinyMnistError(f"{run_dir}: this run is finished; there is nothing to resume")
        raise TinyMnistError(f"{run_dir}: no {STATE_FILE} (the run finished no epoch, or it predates resumable runs)")
    state = _load_marked(path, STATE_FORMAT, "resume state")
    if state.get("config") != meta["config"]:
        raise TinyMnistError(f"{path}: saved by a different recipe than {run_dir}/config.json holds")
    return state


def _advance(run_dir: Path, meta: dict, trainer: Trainer, until: Optional[int], progress: Optional[bool],
             verbose: bool, on_epoch: Optional[Callable[[dict], None]]) -> list[dict]:
    """Train up to epoch `until` (None: to the end), writing the state and history.json after every epoch, and
    the model and curves after the last one; return the history so far."""
    cfg = trainer.cfg

    def saved(record: dict) -> None:
        if not trainer.done:  # a crash after this resumes from here; after the last epoch, model.pt is next
            with atomic_path(run_dir / STATE_FILE) as tmp:
                torch.save({"format": STATE_FORMAT, "config": meta["config"], **trainer.state_dict()}, tmp)
        write_json(run_dir / "history.json", trainer.history)  # a crash keeps the epochs done
        if trainer.teacher is not None and not (run_dir / TEACHER_FILE).is_file():
            # distillation: the teacher's recipe and history, so the run states the epochs it cost
            write_json(run_dir / TEACHER_FILE, {"step": cfg.teacher, "epochs": len(trainer.teacher_history),
                                                "config": trainer.teacher_resolved.to_dict(),
                                                "history": trainer.teacher_history})
        if on_epoch is not None:
            on_epoch(record)

    trainer.run(until, saved, progress, verbose)
    if trainer.done:
        save_checkpoint(run_dir / "model.pt", trainer.final, cfg)
        plot_curves(trainer.history, run_dir / "curves.png",
                    title=f"{meta['name']} ({cfg.model}, {meta['params']:,} params)", averaged=bool(cfg.ema))
        (run_dir / STATE_FILE).unlink(missing_ok=True)
    return list(trainer.history)


_data_cache: dict = {}  # one dataset per worker process: (directory, its files' stamps, device) -> MNIST


def _cached_data(data_dir: Optional[str], device: torch.device) -> MNIST:
    root = resolve_data_dir(data_dir)
    stamps = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.iterdir() if f.is_file())
                   ) if root.is_dir() else ()
    key = (str(root.resolve()), stamps, str(device))
    if key not in _data_cache:
        _data_cache.clear()
        _data_cache[key] = load_mnist(data_dir, device=device, progress=False)
    return _data_cache[key]


def train_job(config: dict, run_dir: str, name: str, data_dir: Optional[str], device: str, threads: int,
              part: Optional[int] = None, teacher: Optional[dict] = None) -> dict:
    """Train a recipe (as a to_dict() dict) into `run_dir`, quietly; module-level, so a worker process can run it.

    part=None trains the whole run; part=k trains epoch k+1 only (resuming from the state epoch k left), so that
    a run's epochs can go to whichever worker is free (parallel.Job.parts)."""
    cfg = TrainConfig.from_dict(config)
    teacher = TrainConfig.from_dict(teacher) if teacher else None
    if part is None:
        _, history = train_run(cfg, out=run_dir, data_dir=data_dir, device=device, name=name, progress=False,
                               verbose=False, threads=threads, teacher=teacher)
    else:
        data = _cached_data(data_dir, pick_device(device))
        if part == 0:
            _, history = train_run(cfg, out=run_dir, device=device, name=name, progress=False, verbose=False,
                                   threads=threads, data=data, until=1, teacher=teacher)
        else:
            _, history = resume_run(run_dir, progress=False, verbose=False, threads=threads, data=data,
                                    until=part + 1, expect_epoch=part, models=cfg.models_file or None)
    return {"seed": cfg.seed, "history": history, "run_dir": run_dir}


def train_many(runs: Sequence[tuple[str, TrainConfig, Path, str]], workers: int, threads: int,
               data_dir: Optional[str], device: str, on_done: Optional[Callable] = None,
               progress: Optional[bool] = None, desc: str = "runs", confine: Optional[Callable] = None,
               teacher_of: Optional[Callable[[TrainConfig], TrainConfig]] = None) -> list:
    """Train several recipes into their run directories, `workers` processes at a time with `threads` each (epoch
    by epoch when there is more than one worker, so the last runs share the cores); `runs` holds (label, recipe,
    run directory, name). A failed run is one line, "label: FAILED: why", and ends only itself; on_done sees each
    run that finished. Returns parallel.Outcome objects in the order given. What check, reproduce and a grader's
    retraining train (`confine`: parallel.run_jobs's, for a stranger's network; `teacher_of`: a distilled recipe's
    teacher's recipe, resolved here, in the parent)."""
    from .parallel import Job, print_failed, run_jobs

    jobs = [Job(label, train_job, dict(config=cfg.to_dict(), run_dir=str(run_dir), name=name, data_dir=data_dir,
                                       device=device, threads=threads,
                                       teacher=teacher_of(cfg).to_dict() if cfg.teacher and teacher_of else None),
                parts=cfg.epochs if workers > 1 else 1)
            for label, cfg, run_dir, name in runs]

    def done(outcome) -> None:
        if not print_failed(outcome) and on_done is not None:
            on_done(outcome)

    return run_jobs(jobs, workers, threads, on_done=done, progress=progress, desc=desc, confine=confine)
