"""Retrain where asked: tinymnist's own check of chosen rows of a graded class, with the answer's recipe over seeds
0..N-1, resumable, and spread over machines when asked.

Every (row, seed) run is a trial of one Optuna study, whose name follows from what is retrained (each file's SHA-256,
its class, the recipe and the seeds), so the same command finds the same study again: in a SQLite file under
--state by default, or in a shared database (`--storage postgresql://...`), where every machine that runs the same
command takes the next run. A run trains in a worker process of the parallel engine (parallel.run_jobs), confined by
sandbox.confine_worker: the stranger's class is never built in the grader's process. A finished run is kept; a killed
worker's run stops sending heartbeats, is failed, queued again and trained by whoever is free: it loses only its own
run. When every run of a row is complete, its evidence is a check's (check.py), judged and plotted the same way."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from ..errors import TinyMnistError, install_hint
from ..fileio import read_json, write_json
from ..target import LAST

STUDY_FILE = "retrain.db"


def eligible(rows, everyone: bool) -> list:
    """The rows to retrain: with a graded model, and passing their own log unless `everyone`."""
    return [r for r in rows if r.params is not None and r.model and r.source and (everyone or r.verdict == "PASS")]


def _recipe(row, overrides: Optional[dict] = None):
    """The answer's recipe for the row's class, with `overrides` (never built here: the config is plain data)."""
    from ..lab.check import check_recipe
    from ..lab.series import answer

    return check_recipe(answer(), row.model, row.source, overrides)


def study_name(rows, seeds: int, overrides: Optional[dict] = None) -> str:
    """The study's name, the same on every machine that retrains the same files, classes, recipe and seeds."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.slug}\0{r.model}\0{_sha(r.source)}\0".encode())
    recipe = _recipe(rows[0], overrides).recipe() if rows else {}
    recipe.pop("model", None), recipe.pop("models_file", None)  # the machine's own path to the file differs
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(str(seeds).encode())
    return f"grade-{h.hexdigest()[:12]}"


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def retrain(rows, seeds: int, everyone: bool = False, state: str | Path = "grading", jobs: int = 0,
            threads: int = 0, data_dir: Optional[str] = None, device: str = "auto", storage: Optional[str] = None,
            memory_mb: int = 2048, progress: Optional[bool] = None, log=print,
            overrides: Optional[dict] = None, heartbeat: Optional[int] = None) -> dict:
    """Retrain the eligible rows over seeds 0..seeds-1; set each row's `check`, and return {row slug: (evidence,
    plot path)} for the rows whose every run is complete."""
    try:
        import optuna  # noqa: F401 - retraining needs the sweep extra: say so before anything starts
    except ModuleNotFoundError:
        raise TinyMnistError(f"retraining spreads its runs through Optuna: {install_hint('sweep')}") from None
    from ..core.data import load_mnist
    from ..core.parallel import plan

    chosen = eligible(rows, everyone)
    if not chosen:
        log("retrain: no row to retrain (none passes its own log; --retrain-all takes every graded model)")
        return {}
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    load_mnist(data_dir, progress=False)  # here, with the network: the confined workers have none
    name = study_name(chosen, seeds, overrides)
    from ..lab.space import HEARTBEAT

    heartbeat = heartbeat or HEARTBEAT
    study, store, created = _open(storage, state, name, heartbeat)
    runs = [(r, s) for r in chosen for s in range(seeds)]
    _enqueue(study, len(runs), everything=created)
    done = _complete(study)
    todo = len(runs) - len(done)
    workers, per_run = plan(max(1, todo), jobs, threads, "cpu")
    log(f"retrain: {len(chosen)} rows x {seeds} seeds = {len(runs)} runs in study {name}; {len(done)} done, "
        f"{todo} to train, {workers} at a time with {per_run} thread(s) each")
    if todo:
        _work(study, store, runs, state, workers, per_run, data_dir, device, memory_mb, log, overrides, heartbeat)
    return _collect(study, runs, chosen, seeds, state, overrides)


def _open(storage: Optional[str], state: Path, name: str, heartbeat: int):
    import optuna

    from ..lab.sweep import _experimental_quiet, open_storage

    url = storage or f"sqlite:///{(state / STUDY_FILE).resolve()}"
    for attempt in range(3):  # machines that start together on a new database race to create its tables
        try:
            store = open_storage(url, heartbeat)
            break
        except TinyMnistError:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    with _experimental_quiet():
        try:  # one machine creates the study; the others join it
            return optuna.create_study(storage=store, study_name=name, direction="maximize"), store, True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(storage=store, study_name=name), store, False


def _quiet():
    from ..lab.sweep import _experimental_quiet

    return _experimental_quiet()


def _run_of(t) -> Optional[int]:
    return t.params.get("run", t.system_attrs.get("fixed_params", {}).get("run"))


def _enqueue(study, runs: int, everything: bool) -> None:
    """The machine that created the study queues every run; one that joins it (or resumes it) queues again only the
    runs whose every trial failed (a killed worker, a run out of memory), never a finished or a held one. Two
    machines that re-queue at once may queue a run twice: the one that takes it second drops it (_taken)."""
    from optuna.trial import TrialState

    alive = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    seen = {_run_of(t) for t in study.get_trials(deepcopy=False)}
    held = {_run_of(t) for t in study.get_trials(deepcopy=False, states=alive)}
    with _quiet():
        for i in range(runs):
            if (everything and i not in held) or (i in seen and i not in held):
                study.enqueue_trial({"run": i}, user_attrs={"queued": True})


def _taken(study, trial, run: int) -> bool:
    """Whether another trial already finished or is training `run`: a duplicate from two machines' re-queueing."""
    from optuna.trial import TrialState

    return any(t.number != trial.number and _run_of(t) == run
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def _complete(study) -> dict[int, dict]:
    """{run index: its result} of the complete trials (the first, if a run was trained twice)."""
    from optuna.trial import TrialState

    found: dict[int, dict] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "run" in t.params and "result" in t.user_attrs and t.params["run"] not in found:
            found[t.params["run"]] = t.user_attrs["result"]
    return found


def _work(study, store, runs, state: Path, workers: int, threads: int, data_dir, device, memory_mb: int,
          log, overrides: Optional[dict] = None, heartbeat: int = 60) -> None:
    """Take queued runs until none is left: `workers` threads here, each training its run in a confined worker
    process of the parallel engine and keeping its trial alive with heartbeats. Taking a run is serialised here
    (SQLite does not lock the row); PostgreSQL locks it against the other machines."""
    import functools
    from dataclasses import replace

    import optuna
    from optuna.trial import TrialState

    from ..lab.check import worst_of_last
    from ..core.runs import train_many
    from ..models.sandbox import confine_worker

    # the study's database is reached from here, never from a worker: every worker goes without the network
    confine = functools.partial(confine_worker, memory_mb)
    lock = threading.Lock()
    study_id = store.get_study_id_from_name(study.study_name)

    def take():
        with lock, _quiet(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")  # ask/tell keeps its own heartbeat
            optuna.storages.fail_stale_trials(study)  # a killed worker's run: failed, and queued again
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                return None
            trial = study.ask()
            # its first heartbeat at once: a RUNNING trial with none is never stale, so a worker killed before
            # its first beat would hold its run forever (seen under load: the grading then lost that run)
            store.record_heartbeat(store.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        if not trial.user_attrs.get("queued"):  # another machine took the last run first: nothing of ours
            study.tell(trial, state=TrialState.PRUNED)
            return None
        if _taken(study, trial, trial.suggest_int("run", 0, len(runs) - 1)):
            study.tell(trial, state=TrialState.PRUNED)
            return take()
        return trial

    def train(trial) -> float:
        row, seed = runs[trial.suggest_int("run", 0, len(runs) - 1)]
        cfg = replace(_recipe(row, overrides), seed=seed)
        run_dir = state / row.slug / f"seed{seed}"
        if run_dir.exists():  # a killed run's leftovers: it starts again
            import shutil

            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        [outcome] = train_many([(f"{row.slug} seed {seed}", cfg, run_dir, f"{row.slug}-seed{seed}")], 1, threads,
                               data_dir, device, progress=False, confine=confine)
        if not outcome.ok:
            raise TinyMnistError(f"{row.file} seed {seed}: FAILED: {outcome.error}")
        history = outcome.result["history"]
        # the run's saved config and environment go with it: another machine's run directory is not here
        trial.set_user_attr("result", {"seed": seed, "history": history, "run_dir": str(run_dir),
                                       "saved": read_json(run_dir / "config.json")})
        tail = ", ".join(f"{r['test_acc']:.2f}" for r in history[-LAST:])
        with lock:
            log(f"{row.file} ({row.model}) seed {seed}: last {LAST} test accuracies {tail}")
        return worst_of_last(history, min(LAST, len(history)))

    def worker() -> None:
        while (trial := take()) is not None:
            trial_id = store.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            beating = threading.Event()

            def beat():
                while not beating.wait(heartbeat):
                    store.record_heartbeat(trial_id)

            store.record_heartbeat(trial_id)
            pulse = threading.Thread(target=beat, daemon=True)
            pulse.start()
            try:
                study.tell(trial, train(trial))
            except TinyMnistError as e:
                with lock:
                    log(str(e))
                study.tell(trial, state=TrialState.FAIL)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            finally:
                beating.set()
                pulse.join()

    pool = [threading.Thread(target=worker) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _collect(study, runs, chosen, seeds: int, state: Path, overrides: Optional[dict] = None) -> dict:
    """Each row's evidence, a check's, from its complete runs; a row with runs still missing says how many."""
    from ..lab.check import _evidence, proof
    from ..lab.series import answer
    from ..pages.plots import plot_proof

    done = _complete(study)
    out = {}
    for row in chosen:
        results = [done[i] for i, (r, _) in enumerate(runs) if r is row and i in done]
        if len(results) < seeds:
            row.check = {"verdict": f"{len(results)} of {seeds} runs done", "passes": 0, "seeds": len(results),
                         "bound": 0.0}
            continue
        results.sort(key=lambda x: x["seed"])
        for res in results:  # a run trained on another machine: its saved config, here
            if not (Path(res["run_dir"]) / "config.json").is_file():
                res["run_dir"] = str(state / row.slug / f"seed{res['seed']}")
                write_json(Path(res["run_dir"]) / "config.json", res["saved"])
        results = [{k: v for k, v in res.items() if k != "saved"} for res in results]
        cfg = _recipe(row, overrides)
        saved = state / row.slug / "check.json"
        ev = _evidence(answer(), row.model, cfg, results, min(LAST, cfg.epochs), "test_acc", None, state,
                       {"jobs": None, "threads_per_run": None, "handed_out": "runs", "wall_s": None}, results,
                       params=row.params)
        ev["study"] = study.study_name
        write_json(saved, ev)
        plot = saved.with_suffix(".png")
        plot_proof(ev, plot)
        pr = proof(ev)
        row.check = {"verdict": pr.verdict, "passes": pr.passes, "seeds": pr.seeds, "bound": pr.rate_bound}
        out[row.slug] = (read_json(saved), str(plot))
    return out
