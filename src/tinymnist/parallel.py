"""Independent runs in worker processes: the cores split among them, one line per finished run, Ctrl-C safe.

Each run's history depends only on its recipe, seed, device and threads, never on which worker trains it or what
trains beside it: every run seeds its own RNGs and draws its batches from its own generators."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from .device import available_cores, configure_threads
from .errors import TinyMnistError

POLL = 0.5  # seconds between checks that every worker is still alive


@dataclass(frozen=True)
class Job:
    """One run: `fn(**kwargs)` in a worker. `fn` is a module-level function, so a spawned process can import it."""

    label: str  # names the run in messages: "seed 3", "step gap", "trial 12"
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    label: str
    result: Any = None  # what fn returned, if it returned
    error: Optional[str] = None  # one line, if it raised or its worker died

    @property
    def ok(self) -> bool:
        return self.error is None


def plan(runs: int, jobs: int = 0, threads: int = 0, device_type: str = "cpu") -> tuple[int, int]:
    """(workers, threads per worker). jobs=0: one per core on a CPU when there is more than one run, else 1 (a GPU
    is one device); threads=0: the cores divided among the workers."""
    cores = available_cores()
    if jobs <= 0:
        jobs = min(max(1, runs), cores) if device_type == "cpu" else 1
    jobs = max(1, min(jobs, max(1, runs)))
    if threads <= 0:
        threads = max(1, cores // jobs)
    return jobs, threads


def _one_line(e: BaseException) -> str:
    if isinstance(e, TinyMnistError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


def _call(job: Job) -> Outcome:
    try:
        return Outcome(job.label, result=job.fn(**job.kwargs))
    except Exception as e:  # a failed run is reported in one line; the others go on
        return Outcome(job.label, error=_one_line(e))


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds the run: atomic writes drop their temporary files, Optuna fails its trial


def _worker(tasks, results, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides, with SIGTERM
    signal.signal(signal.SIGTERM, _terminated)
    configure_threads(threads)
    try:
        while (item := tasks.get()) is not None:
            i, job = item
            results.put(("start", i, os.getpid()))
            results.put(("done", i, _call(job)))
    except KeyboardInterrupt:
        sys.exit(143)  # stopped by the parent; its run was unwound above, and the parent prints the one line


def run_jobs(jobs: Sequence[Job], workers: int, threads: int, on_done: Optional[Callable[[Outcome], None]] = None,
             progress: Optional[bool] = None, desc: str = "runs") -> list[Outcome]:
    """Run every job, `workers` at a time with `threads` each; return their outcomes in the order given.

    on_done sees each outcome as it finishes (the caller prints its line). A failed run does not stop the others.
    Ctrl-C stops every worker (their open files are discarded, finished runs stay complete) and re-raises."""
    outcomes: list[Optional[Outcome]] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=None if progress is None else not progress,
               dynamic_ncols=True, file=sys.stderr)

    def finish(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            with bar.external_write_mode():
                on_done(outcome)
        bar.update(1)

    try:
        if workers <= 1:
            configure_threads(threads)
            for i, job in enumerate(jobs):
                finish(i, _call(job))
        else:
            _pool(jobs, workers, threads, finish)
    finally:
        bar.close()
    return outcomes  # type: ignore[return-value]


def _pool(jobs: Sequence[Job], workers: int, threads: int, finish: Callable[[int, Outcome], None]) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(jobs):
        tasks.put(item)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(tasks, results, threads), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    running: dict[int, int] = {}  # pid -> job index
    pending = set(range(len(jobs)))

    def settle(i: int, outcome: Outcome) -> None:
        pending.discard(i)
        finish(i, outcome)

    try:
        while pending:
            try:
                msg = results.get(timeout=POLL)
            except queue.Empty:
                for p in procs:
                    if p.exitcode not in (None, 0) and p.pid in running:  # killed mid-run: only its run is lost
                        i = running.pop(p.pid)
                        settle(i, Outcome(jobs[i].label, error=f"worker process died (exit code {p.exitcode})"))
                if pending and not any(p.is_alive() for p in procs) and results.empty():
                    for i in sorted(pending):
                        settle(i, Outcome(jobs[i].label, error="not run: every worker process died"))
                continue
            if msg[0] == "start":
                running[msg[2]] = msg[1]
            else:
                _, i, outcome = msg
                running = {pid: j for pid, j in running.items() if j != i}
                settle(i, outcome)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        raise
    for p in procs:
        p.join()

