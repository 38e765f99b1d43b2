"""`tinymnist reproduce`: train the series' steps again and collect each run into results/<step>/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..accel.device import pick_device
from ..core.parallel import plan
from ..core.runs import new_run_dir, train_many
from ..fileio import atomic_path
from .check import held_out_line
from .series import STEPS, teacher_recipe

RESULTS = Path("results")
RUN_FILES = ("history.json", "config.json", "curves.png")  # what results/<step>/ keeps of a step's run


def collect_run(run_dir: Path, step: str, results: Path = RESULTS) -> Path:
    """Copy a run's history.json, config.json and curves.png into results/<step>/."""
    dest = results / step
    for name in RUN_FILES:
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(Path(run_dir) / name, tmp)
    return dest


def reproduce(only: Optional[list[str]] = None, results: str | Path = RESULTS,
              runs: str | Path = "runs", jobs: int = 0, threads: int = 0, data_dir: Optional[str] = None,
              device: str = "auto", progress: Optional[bool] = None, log=print) -> list[str]:
    """`tinymnist reproduce`: train the steps (all, or `only` these), `jobs` at a time, and collect each run into
    results/ as it finishes; a failed step is one line, and the others finish. Returns the steps that failed (the
    verb then regenerates the pages, whatever failed)."""
    steps = [s for s in STEPS if s.name in (only or [s.name for s in STEPS])]
    workers, per = plan(len(steps), jobs, threads, pick_device(device).type)
    planned = []
    for s in steps:
        run_dir = new_run_dir(s.name, runs)
        run_dir.mkdir(parents=True)
        planned.append((s.name, s.config, run_dir, s.name))

    def done(o) -> None:
        dest = collect_run(Path(o.result["run_dir"]), o.label, Path(results))
        log(f"{o.label}: {held_out_line(o.result['history'])}, results in {dest}")

    log(f"reproduce: {len(steps)} steps, {workers} at a time with {per} thread(s) each")
    outcomes = train_many(planned, workers, per, data_dir, device, on_done=done, progress=progress, desc="reproduce",
                          teacher_of=teacher_recipe)
    return [o.label for o in outcomes if not o.ok]
