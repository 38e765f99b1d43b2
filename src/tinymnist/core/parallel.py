"""Independent runs in worker processes: the cores split among them, one line per finished run, Ctrl-C safe.

Each run's history depends only on its recipe, seed, device and threads, never on which worker trains it or what
trains beside it: every run seeds its own RNGs and draws its batches from its own generators, and a run handed
from one worker to another at an epoch boundary continues from its saved state (runs.resume_run) exactly."""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from ..accel.device import available_cores, configure_threads
from ..errors import TinyMnistError, one_line

POLL = 0.5  # seconds between checks that every worker is still alive
STOP_GRACE = 30.0  # seconds the workers get, together, to unwind their runs after a stop before they are killed


@dataclass(frozen=True)
class Job:
    """One run: `fn(**kwargs)` in a worker. `fn` is a module-level function, so a spawned process can import it.

    parts > 1: the run comes in that many pieces, `fn(**kwargs, part=k)` for k = 0, 1, ... in order, each
    continuing from what the one before left on disk (runs.train_job: one epoch each). Any worker may take any
    piece, so the last runs' pieces spread over every worker instead of leaving cores idle; the last piece's
    return value is the run's result."""

    label: str  # names the run in messages: "seed 3", "step gap", "trial 12"
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    parts: int = 1


@dataclass(frozen=True)
class Outcome:
    label: str
    result: Any = None  # what fn returned, if it returned
    error: Optional[str] = None  # one line, if it raised or its worker died

    @property
    def ok(self) -> bool:
        return self.error is None


class Schedule:
    """Which piece of which run each worker trains: it hands pieces out and owns the map of what every worker holds.

    While there are at least twice as many unfinished runs as workers, a worker keeps the run it has, so runs
    finish (and are reported) early, as whole runs one after another would. After that, a free worker takes
    the next piece of the run with the most pieces left that no worker holds: the last runs share every worker
    and end together, instead of one run finishing alone on one core while the others idle. For n runs of
    equal length on w workers this ends after ceil(total pieces / w) piece-times, the least possible."""

    def __init__(self, parts: Sequence[int], workers: int):
        self.total = list(parts)
        self.left = list(parts)  # pieces not yet done, per run
        self.workers = workers
        self.holding: dict[int, int] = {}  # worker -> the run whose piece it trains now
        self.closed: set[int] = set()  # runs finished or failed
        self.last: dict[int, int] = {}  # worker -> the run it trained last

    def next_piece(self, worker: int) -> Optional[tuple[int, int]]:
        """(run, part) for `worker`, now held by it, or None when no piece is free now."""
        open_runs = [i for i in range(len(self.left)) if i not in self.closed]
        busy = set(self.holding.values())
        free = [i for i in open_runs if i not in busy]
        if not free:
            return None
        mine = self.last.get(worker)
        if mine in free and len(open_runs) >= 2 * self.workers:
            pick = mine
        elif len(open_runs) >= 2 * self.workers:
            pick = min(free, key=lambda i: (self.done_parts(i) > 0 or i in busy, i))  # the next run not yet started
        else:
            pick = max(free, key=lambda i: (self.left[i], -i))
        self.holding[worker] = self.last[worker] = pick
        return pick, self.done_parts(pick)

    def idle(self, workers) -> list[int]:
        """Those of `workers` that hold no piece, in order."""
        return sorted(w for w in workers if w not in self.holding)

    def done_parts(self, i: int) -> int:
        return self.total[i] - self.left[i]

    def piece_done(self, worker: int) -> tuple[int, bool]:
        """Record that `worker` finished its piece; return its run and whether that was the run's last piece."""
        run = self.holding.pop(worker)
        self.left[run] -= 1
        if self.left[run] == 0:
            self.closed.add(run)
        return run, run in self.closed

    def fail(self, run: int) -> int:
        """Close a run that failed (or whose worker died); return the pieces it will never train."""
        self.holding = {w: r for w, r in self.holding.items() if r != run}
        self.closed.add(run)
        return self.left[run]

    @property
    def finished(self) -> bool:
        return len(self.closed) == len(self.left)


def print_failed(outcome: Outcome) -> bool:
    """The one line a failed run (or worker) gets, "label: FAILED: why"; returns whether it failed."""
    if not outcome.ok:
        print(f"{outcome.label}: FAILED: {outcome.error}", flush=True)
    return not outcome.ok


def plan(runs: int, jobs: int = 0, threads: int = 0, device_type: str = "cpu",
         cores: Optional[int] = None) -> tuple[int, int]:
    """(workers, threads per worker). jobs=0: one per core on a CPU when there is more than one run, else 1 (a GPU
    is one device); threads=0: the cores divided among the workers. `cores`: this process's available cores unless
    given."""
    cores = cores or available_cores()
    if jobs <= 0:
        jobs = min(max(1, runs), cores) if device_type == "cpu" else 1
    jobs = max(1, min(jobs, max(1, runs)))
    if threads <= 0:
        threads = max(1, cores // jobs)
    return jobs, threads


def _one_line(e: BaseException) -> str:
    return str(e) if isinstance(e, TinyMnistError) else one_line(e)


def _call(job: Job, part: Optional[int] = None) -> Outcome:
    try:
        kwargs = job.kwargs if part is None else {**job.kwargs, "part": part}
        return Outcome(job.label, result=job.fn(**kwargs))
    except Exception as e:  # a failed run is reported in one line; the others go on
        return Outcome(job.label, error=_one_line(e))


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds the run: atomic writes drop their temporary files, Optuna fails its trial


def _next_task(tasks):
    """The next item of the inbox. The wait wakes every POLL seconds: the kernel may deliver the parent's SIGTERM
    to a helper thread (the queue's feeder), and Python runs its handler only when the main thread runs Python
    code, so a main thread blocked in a bare read would never stop."""
    while True:
        try:
            return tasks.get(timeout=POLL)
        except queue.Empty:
            continue


def _worker(wid: int, tasks, results, threads: int, confine: Optional[Callable[[], Any]] = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides, with SIGTERM
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if confine is not None:  # a stranger's network trains here: the walls go up before any of it runs
            confine()
        configure_threads(threads)
        while (item := _next_task(tasks)) is not None:
            i, part, job = item
            results.put(("done", wid, i, _call(job, part if job.parts > 1 else None)))
    except KeyboardInterrupt:
        # stopped by the parent; its run was unwound above, and the parent prints the one line. The parent reads
        # no more results, so exit without waiting to flush one into the pipe.
        results.cancel_join_thread()
        sys.exit(143)


def run_jobs(jobs: Sequence[Job], workers: int, threads: int, on_done: Optional[Callable[[Outcome], None]] = None,
             progress: Optional[bool] = None, desc: str = "runs",
             confine: Optional[Callable[[], Any]] = None) -> list[Outcome]:
    """Run every job, `workers` at a time with `threads` each; return their outcomes in the order given.

    Jobs in parts go piece by piece to whichever worker Schedule picks. on_done sees each outcome as its run
    finishes (the caller prints its line). A failed run does not stop the others. Ctrl-C stops every worker (their
    open files are discarded, finished runs stay complete) and re-raises. `confine`: a picklable callable each
    worker runs first (sandbox.confine_worker); then even one worker is a process of its own, never this one."""
    outcomes: list[Optional[Outcome]] = [None] * len(jobs)
    pieces = any(j.parts > 1 for j in jobs)
    bar = tqdm(total=sum(j.parts for j in jobs), desc=desc, unit="epoch" if pieces else "run",
               disable=None if progress is None else not progress, dynamic_ncols=True, file=sys.stderr)

    def finish(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            with bar.external_write_mode():
                on_done(outcome)

    try:
        if workers <= 1 and confine is None:
            configure_threads(threads)
            schedule = Schedule([j.parts for j in jobs], 1)
            while not schedule.finished:
                i, part = schedule.next_piece(0)
                outcome = _call(jobs[i], part if jobs[i].parts > 1 else None)
                if not outcome.ok:
                    bar.update(schedule.fail(i))
                    finish(i, outcome)
                elif schedule.piece_done(0)[1]:
                    bar.update(1)
                    finish(i, outcome)
                else:
                    bar.update(1)
        else:
            _pool(jobs, max(1, workers), threads, finish, bar.update, confine)
    finally:
        bar.close()
    return outcomes  # type: ignore[return-value]


class _Workers:
    """Worker processes, each with an inbox that holds one piece at a time, and one queue for their results."""

    def __init__(self, workers: int, threads: int, confine: Optional[Callable[[], Any]] = None):
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(workers)]
        self.procs = [ctx.Process(target=_worker, args=(w, self.inboxes[w], self.results, threads, confine),
                                  daemon=True) for w in range(workers)]
        for p in self.procs:
            p.start()
        self.alive = set(range(workers))

    def hand_out(self, schedule: Schedule, jobs: Sequence[Job]) -> None:
        for w in schedule.idle(self.alive):
            piece = schedule.next_piece(w)
            if piece is None:
                break
            self.inboxes[w].put((piece[0], piece[1], jobs[piece[0]]))

    def dead(self) -> list[tuple[int, int]]:
        """Workers that died since the last look, with their exit codes; they are no longer alive."""
        gone = [(w, self.procs[w].exitcode) for w in sorted(self.alive) if self.procs[w].exitcode is not None]
        self.alive -= {w for w, _ in gone}
        return gone

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join()

    def stop(self) -> None:
        """Stop every worker: one grace period for all of them to unwind their runs, then kill."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()


def _pool(jobs: Sequence[Job], workers: int, threads: int, finish: Callable[[int, Outcome], None],
          advance: Callable[[int], Any], confine: Optional[Callable[[], Any]] = None) -> None:
    pool = _Workers(workers, threads, confine)
    schedule = Schedule([j.parts for j in jobs], workers)

    def fail(i: int, outcome: Outcome) -> None:
        advance(schedule.fail(i))
        finish(i, outcome)

    try:
        pool.hand_out(schedule, jobs)
        while not schedule.finished:
            try:
                _, w, i, outcome = pool.results.get(timeout=POLL)
            except queue.Empty:
                _reap(pool, schedule, jobs, fail)
                pool.hand_out(schedule, jobs)
                continue
            if not outcome.ok:
                fail(i, outcome)
            else:
                advance(1)
                if schedule.piece_done(w)[1]:
                    finish(i, outcome)
            pool.hand_out(schedule, jobs)
    except BaseException:
        pool.stop()
        raise
    pool.close()


def _reap(pool: _Workers, schedule: Schedule, jobs: Sequence[Job], fail: Callable[[int, Outcome], None]) -> None:
    """A worker killed mid-run loses only its run; when every worker is gone, the runs left are not run."""
    for w, code in pool.dead():
        if w in schedule.holding:
            i = schedule.holding[w]
            fail(i, Outcome(jobs[i].label, error=f"worker process died (exit code {code})"))
    if not pool.alive and pool.results.empty():
        for i in range(len(jobs)):
            if i not in schedule.closed:
                fail(i, Outcome(jobs[i].label, error="not run: every worker process died"))
