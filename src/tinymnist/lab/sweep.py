"""Recipe search on Optuna: a TOML space (space.py), an objective measured on validation only, storage that spreads
over machines.

A trial trains its recipe on each of the space's seeds and is judged on the validation split by the space's objective:
the assignment's rule (the worst validation accuracy of the last epochs, the minimum over seeds), or the mean over
seeds and last epochs, which seed noise moves less; both are recorded. The test set chooses nothing: a trial's runs
hold images out, so they never read it (older trials recorded it; `sweep-report --show-test` shows those). Storage is
a SQLite file in --out by default, or any RDB URL Optuna accepts: with PostgreSQL, workers on several machines share
one study. Heartbeats let a worker mark the trial of a killed one failed (and queue it again), so a dead worker loses
only its own run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from ..errors import TinyMnistError, first_line, install_hint
from .series import teacher_recipe
from .space import HEARTBEAT, Space, parse_space, read_space

try:
    import optuna
    from optuna.trial import TrialState
except ModuleNotFoundError:  # an optional extra: the verbs that need it say so in one line
    raise TinyMnistError(f"sweeps need Optuna: {install_hint('sweep')}") from None

STUDY_FILE = "study.db"
# recorded with each pruned trial, by the space's objective: studies span rule changes
PRUNE_RULES = {"worst": "median of min(value, objective)", "mean": "median of the mean over seeds at that epoch"}
OBJECTIVE_WORDS = {"worst": "the worst accuracy of the last epochs, min over seeds",
                   "mean": "the mean accuracy of the last epochs, mean over seeds"}


# ---------------------------------------------------------------- storage


def storage_url(storage: Optional[str], out: str | Path) -> str:
    """An explicit URL, else a SQLite file in `out`."""
    if storage:
        return storage
    Path(out).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(out).resolve() / STUDY_FILE}"


def open_storage(url: str, heartbeat: Optional[int] = HEARTBEAT):
    """Optuna's RDB storage with heartbeats; a URL it cannot open is one TinyMnistError."""
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback

    url = driver_url(url)
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # workers wait for each other's writes instead of failing
    hb = {}
    if heartbeat:
        hb = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    try:
        with _experimental_quiet():
            if heartbeat:
                hb["heartbeat_stale_trial_callback"] = retry(max_retry=1)
            return RDBStorage(url, engine_kwargs=kwargs, **hb)
    except ModuleNotFoundError as e:
        raise TinyMnistError(f"storage {_safe(url)} needs the package {e.name}: {install_hint('sweep')}") from None
    except Exception as e:  # SQLAlchemy's errors: bad URL, server down, wrong password, no such database
        raise TinyMnistError(f"cannot open study storage {_safe(url)}: {first_line(e) or e.__class__.__name__}") from None


PG_DRIVER = "psycopg2"  # what the sweep extra installs (psycopg2-binary)


def driver_url(url: str) -> str:
    """A plain postgresql:// (or postgres://) URL with the driver the sweep extra installs, psycopg2, named.

    SQLAlchemy picks the driver of a plain URL by its own version: psycopg2 up to 2.0, psycopg 3 from 2.1, which
    nothing here installs. Naming the driver makes the URL a user writes work with either; a URL that names its
    driver (postgresql+psycopg://, ...) is left as it is."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # Optuna's own error names what is wrong
        return url
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername=f"postgresql+{PG_DRIVER}").render_as_string(hide_password=False)
    return url


def _safe(url: str) -> str:
    """The URL without its password (SQLAlchemy's own rendering), for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("://", 1)[0] + "://…" if "://" in url else "(not a storage URL)"


@contextlib.contextmanager
def _experimental_quiet():
    """Heartbeats and their retry callback are experimental in Optuna; tinymnist depends on them knowingly."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def load_study(storage: str, study: Optional[str], heartbeat: Optional[int] = None):
    """An existing study; with no name, the only study in the storage."""

    store = open_storage(storage, heartbeat)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if study is None:
        if len(names) != 1:
            raise TinyMnistError(f"{_safe(storage)} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                                 "name one with --study")
        study = names[0]
    if study not in names:
        raise TinyMnistError(f"{_safe(storage)} has no study {study!r} (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study, storage=store)


# ---------------------------------------------------------------- the objective


class Objective:
    """Train a trial's recipe on each of its seeds; return the space's objective on validation (space.OBJECTIVES):
    the worst accuracy of the last epochs (min over seeds), or the mean over seeds and last epochs. Both are
    recorded, with each seed's, whichever the study optimises."""

    def __init__(self, space: Space, out: Path, data, device: str, threads: int):
        self.space, self.out, self.data, self.device, self.threads = space, out, data, device, threads

    def __call__(self, trial) -> float:
        try:
            return self._judge(trial)
        except KeyboardInterrupt:
            # Ctrl-C or kill: Optuna marks the trial failed (a resume retries it) and would log its traceback;
            # the command's own line says what happened
            optuna.logging.set_verbosity(optuna.logging.CRITICAL)
            raise

    def _judge(self, trial) -> float:
        from .check import mean_of_last, worst_of_last
        from ..core.plan import checked_model
        from ..models.model import count_params
        from ..core.runs import train_run
        from ..models.summary import summarize

        space = self.space
        values = {p.name: p.suggest(trial) for p in space.search}
        dup = _duplicate_of(trial, values)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup)
            raise optuna.TrialPruned(f"same parameters as trial {dup}")
        cfg = space.config(values)
        model = checked_model(cfg)
        params, macs = count_params(model), summarize(model).macs
        trial.set_user_attr("params", params)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("config", cfg.to_dict())
        if params > space.max_params:
            trial.set_user_attr("rejected", f"{params:,} parameters > max_params {space.max_params:,}")
            raise optuna.TrialPruned(f"{params} parameters over the budget")
        runs = [str(self.out / "trials" / f"{trial.study.study_name}-trial{trial.number:04d}-seed{s}")
                for s in space.seeds]
        trial.set_user_attr("host", platform.node())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("run_dirs", runs)
        val_worst, val_mean = [], []
        for i, (seed, run_dir) in enumerate(zip(space.seeds, runs)):
            def report(record: dict, i: int = i) -> None:
                trial.report(record["val_acc"], i * cfg.epochs + record["epoch"] - 1)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at", {"seed": seed, "epoch": record["epoch"],
                                                      "rule": PRUNE_RULES[space.objective]})
                    raise optuna.TrialPruned(f"epoch {record['epoch']} of seed {seed}")

            _, history = train_run(dataclasses.replace(cfg, seed=seed), out=run_dir, device=self.device,
                                   name=Path(run_dir).name, progress=False, verbose=False, threads=self.threads,
                                   data=self.data, on_epoch=report, teacher=teacher_recipe(cfg) if cfg.teacher else None)
            val_worst.append(worst_of_last(history, space.last, "val_acc"))
            val_mean.append(mean_of_last(history, space.last, "val_acc"))
        trial.set_user_attr("val_worst", val_worst)  # the trial's runs never read the test set
        trial.set_user_attr("val_mean", [round(v, 4) for v in val_mean])
        return min(val_worst) if space.objective == "worst" else statistics.mean(val_mean)


def _duplicate_of(trial, values: dict) -> Optional[int]:
    """The number of an earlier trial (finished or running) with exactly these parameters, if any."""

    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number != trial.number and t.params == values and "duplicate_of" not in t.user_attrs:
            return t.number
    return None


# ---------------------------------------------------------------- workers


def create_study(space: Space, storage: str, study: str, heartbeat: Optional[int] = HEARTBEAT):
    """Create the study, or load it to resume; a space that changed under a study's name is an error."""

    store = open_storage(storage, heartbeat)
    with _experimental_quiet():  # the study uses these sampler and pruner objects, loaded or new
        st = optuna.create_study(study_name=study, storage=store, direction="maximize", load_if_exists=True,
                                 sampler=_sampler(), pruner=_pruner(space))
    key = space.key()
    saved = st.user_attrs.get("space")
    if saved is None:
        st.set_user_attr("space", key)
        if space.objective != "worst":  # a study without it is judged on the worst (the first studies)
            st.set_user_attr("objective", space.objective)
    elif saved != key:
        raise TinyMnistError(f"study {study!r} was created with another space; use a new --study name")
    return st


def _sampler():

    # constant_liar: a worker treats the other workers' running trials as bad, so workers do not pick the same
    # parameters at once; unseeded, so that two workers never draw the same random start-up trials
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=8)


def _pruner(space: Space):
    return SeedMedianPruner(space.epochs, space.warmup_epochs, space.startup_trials, space.objective)


class SeedMedianPruner(optuna.pruners.BasePruner):
    """The median rule, epoch by epoch of each seed.

    A trial reports seed i's epoch e (from 1) as step i * epochs + e - 1, so every seed's epochs meet the same seed's
    epochs of other trials. Once `startup_trials` trials are complete, a trial is stopped when its value at a step is
    below the median over the complete trials of their value at that step; for the objective "worst" (the minimum
    over seeds), of min(their value at that step, their objective): a complete trial whose other seed ended low sets
    no higher bar than its objective. (Optuna's MedianPruner compares raw per-step values, so under "worst" a layout
    with one strong seed and one weak one pruned trials that could have beaten it; and its warm-up counts steps from
    the trial's start, so a second seed could be pruned after its first epoch.) Never within the first
    warmup_epochs - 1 epochs of any seed."""

    def __init__(self, epochs: int, warmup_epochs: int, startup_trials: int, objective: str = "worst"):
        self.epochs, self.warmup_epochs, self.startup_trials = epochs, warmup_epochs, startup_trials
        self.objective = objective

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if step is None or step % self.epochs < self.warmup_epochs - 1:
            return False
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        bars = [t.intermediate_values[step] if self.objective == "mean" else min(t.intermediate_values[step], t.value)
                for t in done if step in t.intermediate_values and t.value is not None]
        if len(done) < self.startup_trials or not bars:
            return False
        return trial.intermediate_values[step] < statistics.median(bars)


def sweep_worker(space: Space, storage: str, study: str, trials: int, out: str, data_dir: Optional[str], device: str,
                 threads: int, heartbeat: Optional[int] = HEARTBEAT) -> dict:
    """One worker: take trials from the shared study until it holds `trials` complete ones. Module-level, so a
    worker process can run it; several on several machines may share one study."""

    from ..core.data import load_mnist
    from ..accel.device import configure_threads, pick_device

    configure_threads(threads)
    dev = pick_device(device)
    data = load_mnist(data_dir, device=dev, progress=False)
    st = create_study(space, storage, study, heartbeat)
    objective = Objective(space, Path(out), data, device, threads)

    def enough(study) -> bool:
        """The study holds (or is training) the trials asked for. A killed worker's trial, silent past the
        grace period, is failed (and queued again) first, so that it is not counted as running: the reason this is
        not optuna.study.MaxTrialsCallback, which counts such a trial as running until someone fails it."""
        with _experimental_quiet():
            optuna.storages.fail_stale_trials(study)
        return _count(study, TrialState.COMPLETE, TrialState.RUNNING) >= trials

    def stop_when_enough(study, _trial) -> None:
        if enough(study):
            study.stop()

    if not enough(st):
        # at most 4x the budget in this call: a space where nearly every trial is rejected or pruned still ends
        st.optimize(objective, n_trials=4 * trials, callbacks=[stop_when_enough], catch=(TinyMnistError, RuntimeError))
    return {"complete": _count(st, TrialState.COMPLETE)}


def _count(st, *states) -> int:
    return len(st.get_trials(deepcopy=False, states=states))


def run_sweep(space_path: str, trials: int, jobs: int = 0, storage: Optional[str] = None, study: Optional[str] = None,
              out: str = "sweeps", data_dir: Optional[str] = None, device: str = "auto", threads: int = 0,
              heartbeat: Optional[int] = HEARTBEAT, progress: Optional[bool] = None,
              models_file: Optional[str] = None) -> dict:
    """Run `jobs` workers on one study until it holds `trials` complete trials; return a summary. `models_file`:
    the space's model (fixed or searched) names classes of the user's models file."""
    from ..core.data import load_mnist
    from ..accel.device import pick_device
    from ..core.parallel import Job, plan, print_failed, run_jobs

    data = read_space(space_path)
    if models_file:
        data.setdefault("fixed", {})["models_file"] = str(models_file)
    space = parse_space(data, str(space_path))
    study = study or Path(space_path).stem
    url = storage_url(storage, out)
    load_mnist(data_dir, device="cpu", progress=progress is not False)  # download (or fail) once, not per worker
    create_study(space, url, study, heartbeat)  # made once here, so workers never race to create it
    workers, per = plan(trials, jobs, threads, pick_device(device).type)
    print(f"sweep {study}: {trials} complete trials wanted, {workers} worker(s) with {per} thread(s) each; "
          f"storage {_safe(url)}; run directories under {Path(out) / 'trials'}", flush=True)
    kwargs = dict(space=space, storage=url, study=study, trials=trials, out=out, data_dir=data_dir, device=device,
                  threads=per, heartbeat=heartbeat)  # the space as parsed here: workers never read the file
    outcomes = run_jobs([Job(f"worker {i}", sweep_worker, kwargs) for i in range(workers)], workers, per,
                        on_done=print_failed,
                        progress=False, desc="workers")
    st = load_study(url, study)
    summary = summarize_study(st)
    failed = [o.label for o in outcomes if not o.ok]
    if failed:
        raise TinyMnistError(f"{', '.join(failed)} failed; the study keeps every finished trial, and the same "
                             "command resumes it")
    return summary


# ---------------------------------------------------------------- reading a study back


def summarize_study(st) -> dict:
    """Counts by state and the finished trials, best first, as plain data."""

    trials = st.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    rejected = sum("rejected" in t.user_attrs for t in trials)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    rows = [{"trial": t.number, "objective": t.value, "params": t.user_attrs.get("params"),
             "macs": t.user_attrs.get("macs"), "values": t.params, "val_worst": t.user_attrs.get("val_worst"),
             "val_mean": t.user_attrs.get("val_mean"),
             "test_worst": t.user_attrs.get("test_worst"), "run_dirs": t.user_attrs.get("run_dirs"),
             "host": t.user_attrs.get("host")} for t in done]
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    return {"study": st.study_name, "objective": st.user_attrs.get("objective", "worst"), "started": min(starts).isoformat(timespec="seconds") if starts else None,
            "counts": {k: v for k, v in counts.items() if v}, "rejected_over_budget": rejected, "trials": rows}


def format_report(summary: dict, top: int = 10, show_test: bool = False) -> str:
    """The best trials as text: objective (validation), parameters, MACs, searched values, run directory."""
    c = summary["counts"]
    lines = [f"study {summary['study']}: " + (", ".join(f"{v} {k}" for k, v in c.items()) or "no trial yet")
             + (f" ({summary['rejected_over_budget']} of the pruned were over the parameter budget)"
                if summary["rejected_over_budget"] else "")]
    if not summary["trials"]:
        return "\n".join(lines + ["no complete trial yet"])
    lines.append(f"best {min(top, len(summary['trials']))} by the study's objective on validation: "
                 f"{OBJECTIVE_WORDS[summary.get('objective', 'worst')]}:")
    for r in summary["trials"][:top]:
        test = ""
        if show_test:  # trials since validation runs stopped reading the test set have none to show
            test = f"  test worst {min(r['test_worst']):.2f}%" if r.get("test_worst") else "  test not read"
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in r["values"].items())
        score = f"val {summary.get('objective', 'worst')} {r['objective']:.2f}%"
        if summary.get("objective", "worst") != "worst" and r.get("val_worst"):
            score += f" (worst {min(r['val_worst']):.2f}%)"
        lines.append(f"  #{r['trial']:<4} {score}{test}  {r['params']:,} params  "
                     f"{r['macs'] / 1e6:.2f}M MACs  {values}  {(r['run_dirs'] or ['?'])[0]}")
    if not show_test:
        lines.append("test accuracies are hidden: choose on validation, then confirm the choice once with "
                     "`tinymnist check` (older trials recorded one: --show-test shows it)")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if isinstance(v, str) else str(v)


def plot_study(st, out_dir: str | Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, drawn with matplotlib, written atomically."""
    from ..core.curves import save_figure  # matplotlib with the Agg backend: files only

    written = []
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:  # nothing to draw (Optuna would log a warning and draw empty axes)
        return written
    plots = [("history.png", optuna.visualization.matplotlib.plot_optimization_history)]
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
        plots.append(("importances.png", optuna.visualization.matplotlib.plot_param_importances))
    for name, fn in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = fn(st)
            except (ValueError, RuntimeError) as e:  # e.g. importances of a parameter that never varied
                print(f"{name}: not drawn ({first_line(e) or e.__class__.__name__})", file=sys.stderr)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        path = Path(out_dir) / f"{st.study_name}-{name}"
        save_figure(fig, path)
        written.append(path)
    return written


def resolve_storage(target: str) -> str:
    """sweep-report's argument: a sweep's --out directory (its SQLite file) or a storage URL."""
    if "://" in target:
        return target
    path = Path(target)
    db = path / STUDY_FILE if path.is_dir() else path
    if not db.is_file():
        raise TinyMnistError(f"{target}: no {STUDY_FILE} here (give a sweep's --out directory or a storage URL)")
    return f"sqlite:///{db.resolve()}"

