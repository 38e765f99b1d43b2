"""The tinymnist command line. Every subcommand is a thin wrapper over library functions."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from .errors import TinyMnistError, UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None/False ones, whose help text already says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _checked(convert, ok, expected: str):
    """An argparse `type` that converts, then checks, and names what it expected when either fails."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_top_k = _checked(int, lambda v: 1 <= v <= 10, "an integer from 1 to 10")
_port = _checked(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


def _add_data_device(p: argparse.ArgumentParser) -> None:
    from .data import ENV_VAR, default_data_dir
    from .device import DEVICES

    p.add_argument("--data-dir", default=None,
                   help=f"directory holding the MNIST files (default: ${ENV_VAR}, else {default_data_dir()})")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to train")
    p.add_argument("--threads", type=_nonneg_int, default=0,
                   help="CPU threads per run (0 = the available cores, divided among the parallel runs)")


def _add_models(p: argparse.ArgumentParser, what: str = "--model NAME picks one") -> None:
    p.add_argument("--models", default=None, metavar="FILE.py",
                   help=f"a Python file of your own nn.Module classes (forward: (N,1,28,28) -> (N,10)); {what}")


def _user_model(args: argparse.Namespace, name: Optional[str], flag: str = "--model") -> Optional[str]:
    """The model a command names, checked against the --models file (or tinymnist's models and registered ones);
    with a --models file and no name, its only class. An unknown name is a usage error listing the valid ones."""
    from .model import list_models

    if args.models:
        from .usermodels import load_models_file

        found = load_models_file(args.models)
        if name is None:
            if len(found.classes) == 1:
                return next(iter(found.classes))
            raise UsageError(f"{args.models} defines {len(found.classes)} models: name one with {flag} "
                             f"(choose from {', '.join(found.classes)})")
        if name not in found.classes:
            raise UsageError(f"argument {flag}: invalid choice: {name!r} ({found.choices()})")
        return name
    if name is not None and name not in list_models():
        raise UsageError(f"argument {flag}: invalid choice: {name!r} (choose from {', '.join(list_models())})")
    return name


def _recipe_for(step, args: argparse.Namespace, **extra):
    """A step's recipe with the command's overrides, for --model/--models when given; validated."""
    from .check import check_recipe

    model = _user_model(args, getattr(args, "model", None))
    return check_recipe(step, model, args.models, _overrides(args, **extra)).validate()


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=_nonneg_int, default=0,
                   help="runs trained at once, each in its own process (0 = one per core on a CPU, 1 on a GPU)")


def recipe_options() -> list:
    """The TrainConfig fields the training verbs take as --options (their metadata says cli)."""
    import dataclasses

    from .config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")]


def _add_recipe_overrides(p: argparse.ArgumentParser) -> None:
    """Options that override single fields of a step's recipe, generated from TrainConfig's field metadata (help,
    choices, accepted values); unset ones keep the recipe's value."""
    from .kernels import OPS

    g = p.add_argument_group("recipe overrides (default: the step's own value)")
    for f in recipe_options():
        meta = f.metadata
        kwargs: dict = {"default": None, "help": meta["help"].replace("{ops}", ", ".join(OPS))}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        elif meta.get("convert"):
            ok = meta.get("ok") or (lambda v: True)
            kwargs["type"] = _checked(meta["convert"], ok, meta.get("expected") or meta["convert"].__name__)
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        g.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _overrides(args: argparse.Namespace, **extra) -> dict:
    values = {f.name: getattr(args, f.name) for f in recipe_options()}
    values.update(extra)
    return values


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = _Parser(prog="tinymnist", formatter_class=fmt,
                     description="Tiny CNNs for MNIST: train, summarise, check and use them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_model_verbs(sub, fmt)
    _add_series_verbs(sub, fmt)
    _add_use_verbs(sub, fmt)
    return parser


def _add_model_verbs(sub, fmt) -> None:
    """The verbs about models and training one: models, summary, train, resume, experiments."""
    from .experiments import ANSWER_WHY, answer, step_names
    from .model import list_models

    p = sub.add_parser("models", help="list the models and their parameter counts", formatter_class=fmt)
    _add_models(p, "list its models instead of tinymnist's")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-layer shapes, parameters, receptive field and MACs", formatter_class=fmt)
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(list_models())}; or a class of --models")
    _add_models(p, "MODEL names one of its classes")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a step's recipe (default: the series' answer) and write a run directory",
                       formatter_class=fmt)
    p.add_argument("--step", choices=step_names(), default=None, metavar="STEP",
                   help=f"experiment step whose recipe to train (one of: {', '.join(step_names())}; "
                        f"default: {answer().name}, {ANSWER_WHY})")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"train this model with the step's recipe (one of: {', '.join(list_models())}; or a class "
                        "of --models)")
    _add_models(p)
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seeds every RNG")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>-<timestamp>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_recipe_overrides(p)
    _add_data_device(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a stopped run (Ctrl-C, a crash) from its last finished epoch",
                       formatter_class=fmt)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory that train, check or reproduce wrote")
    p.add_argument("--data-dir", default=None, help="directory holding the MNIST files (default: as for train)")
    p.add_argument("--threads", type=_nonneg_int, default=0,
                   help="CPU threads (0 = the count the run recorded: the history depends on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("experiments", help="the experiment series, one line per step", formatter_class=fmt)
    p.set_defaults(func=cmd_experiments)


def _add_series_verbs(sub, fmt) -> None:
    """The verbs about the series and its evidence: reproduce, report, check, sweep, sweep-report."""
    from .experiments import ANSWER_WHY, answer, step_names

    p = sub.add_parser("reproduce", help="train the steps, write results/ and regenerate the README and docs/",
                       formatter_class=fmt)
    p.add_argument("--only", nargs="+", choices=step_names(), metavar="STEP", default=None,
                   help=f"train only these steps (default: all of {', '.join(step_names())})")
    p.add_argument("--results", default="results", help="results directory")
    p.add_argument("--root", default=".", help="checkout whose README.md and docs/ pages are regenerated")
    p.add_argument("--runs", default="runs", help="where the run directories go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_jobs(p)
    _add_data_device(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="regenerate the generated sections of the README and docs/ from results/ "
                                      "(no training)", formatter_class=fmt)
    p.add_argument("--results", default="results", help="results directory")
    p.add_argument("--root", default=".", help="checkout whose README.md and docs/ pages are regenerated")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check", help="train a step (or your model, with its recipe) with seeds 0..N-1 and judge the "
                                     "target rules", formatter_class=fmt)
    p.add_argument("step", nargs="?", choices=step_names(), default=None, metavar="STEP",
                   help=f"one of: {', '.join(step_names())} (default: {answer().name}, {ANSWER_WHY}); its recipe "
                        "trains --model when given")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="check this model with the step's recipe (one of tinymnist's, or a class of --models)")
    _add_models(p)
    p.add_argument("--max-params", type=_positive_int, default=None, metavar="N",
                   help="the parameter rule: at most N parameters (default: the step's own budget; for --model, the "
                        "assignment's, fewer than 8,000)")
    p.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds, 0..N-1")
    p.add_argument("--last", type=_positive_int, default=5, help="epochs at the end that must all pass")
    p.add_argument("--json", default=None, metavar="FILE", help="write the evidence (histories, verdict) here")
    p.add_argument("--runs", default="runs", help="where the run directories go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_recipe_overrides(p)
    _add_jobs(p)
    _add_data_device(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sweep", help="search recipes on validation with Optuna (needs pip install 'tinymnist[sweep]')",
                       formatter_class=fmt)
    p.add_argument("space", metavar="SPACE.toml", help="the search space: base step, [fixed], [search], seeds, "
                                                        "max_params (see the README)")
    p.add_argument("--trials", type=_positive_int, required=True,
                   help="complete trials the study should hold; the same command again resumes it")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage, e.g. postgresql://user:pass@host/db for workers on several machines "
                        "(default: sqlite in --out)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the space file's name)")
    p.add_argument("--out", default="sweeps", help="directory for the SQLite study and every trial's run directory")
    p.add_argument("--heartbeat", type=_positive_int, default=60, metavar="SECONDS",
                   help="a running trial's heartbeat; one silent for twice this is marked failed and queued again")
    _add_models(p, "the space's model (fixed or searched) names its classes")
    _add_jobs(p)
    _add_data_device(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("screen", help="screen named candidates on validation, confirm the best over 5 validation "
                                      "seeds, and say which earned a look at test", formatter_class=fmt)
    p.add_argument("file", metavar="SCREEN.toml", help="the base step and its candidates (format: docs/searches.md)")
    p.add_argument("--results", default="results", help="results directory: evidence goes to results/screen-<name>/")
    p.add_argument("--runs", default="runs", help="where the run directories go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_jobs(p)
    _add_data_device(p)
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("sweep-report", help="the best trials of a study, and its plots", formatter_class=fmt)
    p.add_argument("target", metavar="DIR_OR_STORAGE", help="a sweep's --out directory, or a storage URL")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the only study there)")
    p.add_argument("--top", type=_positive_int, default=10, help="how many trials to list")
    p.add_argument("--show-test", action="store_true",
                   help="also show the test accuracy that trials recorded before validation runs stopped reading "
                        "the test set (newer trials have none)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write the optimisation history and parameter importances here (default: the sweep's "
                        "directory, or the current one for a URL)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every complete trial as JSON (an audit trail)")
    p.set_defaults(func=cmd_sweep_report)


def _add_use_verbs(sub, fmt) -> None:
    """The verbs that use a trained model, and the benchmark: errors, demo, predict, export, bench."""
    from .device import DEVICES
    from .experiments import answer
    from .model import list_models

    p = sub.add_parser("errors", help="the test images a checkpoint gets wrong: a picture grid, the confusion "
                                      "matrix and errors.json", formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the checkpoint's directory)")
    p.add_argument("--data-dir", default=None, help="directory holding the MNIST files")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to run the model")
    _add_models(p, "needed for a checkpoint of one of its models")
    p.set_defaults(func=cmd_errors)

    p = sub.add_parser("demo", help="a local web page: draw a digit and see what the model says", formatter_class=fmt)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a run's model.pt (default: the newest under runs/, else the trained model in the package)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: only this machine)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0 = any free one)")
    _add_models(p, "needed for a checkpoint of one of its models")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="classify digits in image files with a trained model", formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt, or an .onnx file from export")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, BMP, GIF, TIFF, WebP ... any size or mode")
    _add_models(p, "needed for a model.pt of one of its models (never for .onnx)")
    p.add_argument("--top", type=_top_k, default=3, help="how many of the most likely digits to show (1-10)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to run the model")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model to ONNX (needs pip install 'tinymnist[onnx]')",
                       formatter_class=fmt)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt")
    p.add_argument("--onnx", required=True, metavar="OUT", help="where to write the .onnx file")
    _add_models(p, "needed for a checkpoint of one of its models; the .onnx file needs it no more")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="throughput: our pipeline vs the classic DataLoader pipeline vs the bare model",
                       formatter_class=fmt)
    p.add_argument("--model", choices=list_models(), default=None, metavar="NAME",
                   help=f"model to train (default: the series' answer's, {answer().config.model})")
    p.add_argument("--steps", type=_positive_int, default=60, help="timed training steps per repeat")
    p.add_argument("--repeats", type=_positive_int, default=3, help="repeats per pipeline; the median is reported")
    p.add_argument("--batch-size", type=_positive_int, default=answer().config.batch_size, help="batch size")
    p.add_argument("--workers", type=_nonneg_int, default=2, help="DataLoader workers of the classic pipeline")
    p.add_argument("--no-epoch", action="store_true", help="skip timing one full epoch plus a test pass")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="precision of the training step, the same for all pipelines but plain (always fp32)")
    p.add_argument("--concurrency", type=float, default=6.0, metavar="SECONDS",
                   help="time window of the concurrent-process measurements (0 skips them)")
    p.add_argument("--train-runs", type=_nonneg_int, default=0,
                   help="also time N complete `tinymnist train` runs of the default recipe (minutes each)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures and ratios here")
    _add_data_device(p)
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from .model import count_params, create_model, list_models

    if args.models:
        from .usermodels import check_forward, load_models_file

        found = load_models_file(args.models)
        classes = {name: cls() for name, cls in found.classes.items()}
        for name, model in classes.items():
            check_forward(model, name, args.models)
        rows = [(name, count_params(m), type(m).__doc__) for name, m in classes.items()]
    else:
        rows = [(n, count_params(create_model(n)), type(create_model(n)).__doc__) for n in list_models()]
    for name, params, doc in rows:
        print(f"{name:<10}{params:>9,} params  {(doc or '').strip().splitlines()[0] if doc else ''}".rstrip())
    if args.models:
        for name, why in found.skipped.items():
            print(f"{name:<10}  skipped: {why}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .summary import format_summary, summarize

    name = _user_model(args, args.model, "MODEL")
    cfg = TrainConfig(model=name, models_file=args.models or "")
    if cfg.user_model:
        from .usermodels import check_forward

        check_forward(cfg.build_model(), name, args.models or "")
    print(format_summary(summarize(cfg.build_model()), title=name))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .experiments import ANSWER_WHY, answer, get_step
    from .model import count_params
    from .runs import train_run

    step = get_step(args.step) if args.step else answer()
    cfg = _recipe_for(step, args, seed=args.seed)
    name = step.name if cfg.model == step.config.model and not cfg.user_model else cfg.model
    size = f"{count_params(cfg.build_model()):,} parameters, seed {cfg.seed}"
    if name == step.name:
        why = f"the answer: {ANSWER_WHY}" if step is answer() else "chosen with --step"
        print(f"training step {step.name} ({cfg.model}, {size}): {why}", flush=True)
    else:
        source = f" from {args.models}" if args.models else ""
        print(f"training {cfg.model}{source} ({size}) with the recipe of step {step.name}", flush=True)
    run_dir, history = train_run(cfg, out=args.out, data_dir=args.data_dir, device=args.device, name=name,
                                 progress=False if args.no_progress else None, threads=args.threads)
    print(f"{_held_out_line(history)}; run directory: {run_dir}")
    return 0


def _held_out_line(history: list[dict]) -> str:
    """The best and last held-out accuracy of a run: test, or validation for a run that holds images out (it never
    reads the test set)."""
    from .check import held_out

    metric = held_out(history)
    what, note = (("test", "") if metric == "test_acc"
                  else ("validation", " (a validation run: the test set is not read)"))
    best = max(history, key=lambda r: r[metric])
    return (f"best {what} accuracy {best[metric]:.2f}% (epoch {best['epoch']}); final {history[-1][metric]:.2f}%"
            f"{note}")


def cmd_resume(args: argparse.Namespace) -> int:
    from .runs import resume_run

    run_dir, history = resume_run(args.run_dir, data_dir=args.data_dir, threads=args.threads,
                                  progress=False if args.no_progress else None)
    print(f"{_held_out_line(history)} after epoch {history[-1]['epoch']}; run directory: {run_dir}")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from .experiments import STEPS

    for s in STEPS:
        params = s.config.build_model().num_params()
        print(f"{s.name:<14}{s.config.model:<9}{params:>8,} params  {s.config.epochs:>2} epochs  {s.title}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .device import pick_device
    from .experiments import STEPS
    from .parallel import plan
    from .report import collect_run
    from .runs import new_run_dir, train_many

    steps = [s for s in STEPS if s.name in (args.only or [s.name for s in STEPS])]
    workers, threads = plan(len(steps), args.jobs, args.threads, pick_device(args.device).type)
    runs = []
    for s in steps:
        run_dir = new_run_dir(s.name, args.runs)
        run_dir.mkdir(parents=True)
        runs.append((s.name, s.config, run_dir, s.name))

    def done(o) -> None:
        dest = collect_run(Path(o.result["run_dir"]), o.label, Path(args.results))
        print(f"{o.label}: {_held_out_line(o.result['history'])}, results in {dest}", flush=True)

    print(f"reproduce: {len(steps)} steps, {workers} at a time with {threads} thread(s) each", flush=True)
    outcomes = train_many(runs, workers, threads, args.data_dir, args.device, on_done=done,
                          progress=False if args.no_progress else None, desc="reproduce")
    _report_pages(args.root, args.results)
    failed = [o.label for o in outcomes if not o.ok]
    if failed:
        raise TinyMnistError(f"{len(failed)} of {len(steps)} steps failed: {', '.join(failed)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiments import STEPS
    from .report import replot, replot_checks, replot_frontier, step_result

    for s in STEPS:
        if step_result(s, Path(args.results)) is not None:
            replot(s, Path(args.results))
    replot_checks(Path(args.results))
    replot_frontier(Path(args.results))
    _report_pages(args.root, args.results)
    return 0


def _report_pages(root: str, results: str) -> None:
    from pathlib import Path

    from .report import update_pages

    changed = update_pages(Path(root), Path(results))
    print(f"regenerated {'; '.join(changed) if changed else 'nothing (every page already up to date)'}")


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .check import run_check
    from .experiments import answer, get_step
    from .fileio import write_json
    from .mistakes import plot_proof
    from .runs import new_run_dir

    step = get_step(args.step) if args.step else answer()
    cfg = _recipe_for(step, args)
    evidence = run_check(step.name, args.seeds, args.last, data_dir=args.data_dir, device=args.device,
                         out_root=args.runs, progress=False if args.no_progress else None, threads=args.threads,
                         jobs=args.jobs, recipe=cfg, max_params=args.max_params)
    if args.json:
        write_json(args.json, evidence)
        print(f"evidence written to {args.json}")
    plot = Path(args.json).with_suffix(".png") if args.json else new_run_dir(f"check-{evidence['label']}", args.runs
                                                                             ).with_suffix(".png")
    plot_proof(evidence, plot)
    print(f"proof plot written to {plot}")
    return 0 if evidence["passed"] else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import format_report, run_sweep

    summary = run_sweep(args.space, args.trials, jobs=args.jobs, storage=args.storage, study=args.study, out=args.out,
                        data_dir=args.data_dir, device=args.device, threads=args.threads, heartbeat=args.heartbeat,
                        models_file=args.models)
    print(format_report(summary, top=5))
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from .screen import run_screen

    run_screen(args.file, args.results, jobs=args.jobs, threads=args.threads, data_dir=args.data_dir,
               device=args.device, runs=args.runs, progress=False if args.no_progress else None)
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fileio import write_json
    from .sweep import format_report, load_study, plot_study, resolve_storage, summarize_study

    url = resolve_storage(args.target)
    st = load_study(url, args.study)
    summary = summarize_study(st)
    print(format_report(summary, top=args.top, show_test=args.show_test))
    plots = args.plots or (args.target if "://" not in args.target and Path(args.target).is_dir() else ".")
    for path in plot_study(st, plots):
        print(f"wrote {path}")
    if args.json:
        write_json(args.json, summary)
        print(f"trials written to {args.json}")
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    from .mistakes import CONFUSION_FILE, ERRORS_FILE, GRID_FILE, run_errors

    out, result = run_errors(args.checkpoint, args.out, args.data_dir, args.device, models=args.models)
    print(f"{result['errors']} of {result['test_images']:,} test images misclassified "
          f"(test accuracy {result['test_acc']:.2f}%); wrote {out / ERRORS_FILE}, {out / GRID_FILE}, "
          f"{out / CONFUSION_FILE}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import serve

    serve(args.checkpoint, args.host, args.port, models=args.models)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    import torch

    from .device import pick_device
    from .predict import ImageError, classify, load_classifier, load_image

    model = load_classifier(args.checkpoint, pick_device(args.device), models=args.models)
    images, names, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path))
            names.append(path)
        except ImageError as e:
            print(f"tinymnist: error: {e}", file=sys.stderr)
            failed += 1
    preds = classify(model, torch.stack(images), names, args.top) if images else []
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    else:
        for p in preds:
            top = ", ".join(f"{d} {q:.3f}" for d, q in p.top)
            print(f"{p.file}: {p.digit} (p={p.probability:.3f})  top {len(p.top)}: {top}")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .runs import load_checkpoint

    model, cfg = load_checkpoint(args.checkpoint, models=args.models)
    path = export_onnx(model, args.onnx)
    print(f"wrote {path} ({cfg.model}; input 'image' (N, 1, 28, 28) normalised, output 'logits' (N, 10))")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .bench import run_bench
    from .data import load_mnist
    from .device import configure_threads, pick_device
    from .experiments import answer
    from .fileio import write_json

    device = pick_device(args.device)
    configure_threads(args.threads)
    cfg = replace(answer().config, batch_size=args.batch_size, precision=args.precision)
    data = load_mnist(args.data_dir, device=device)
    result = run_bench(data, args.model or cfg.model, cfg, steps=args.steps, repeats=args.repeats,
                       epoch=not args.no_epoch, workers=args.workers, data_dir=args.data_dir,
                       concurrency=args.concurrency)
    if args.train_runs:
        from .bench import time_training

        result["train_runs"] = time_training(args.train_runs, args.data_dir, args.device, args.precision)
    if args.json:
        write_json(args.json, result)
        print(f"results written to {args.json}")
    return 0


@contextlib.contextmanager
def _sigterm_unwinds():
    """`kill` (or a job scheduler's stop) unwinds like Ctrl-C: parallel workers are stopped, no temporary file is
    left, and the verb ends with one line. Python's default would end this process at once and orphan its workers."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `tinymnist` console script."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with _sigterm_unwinds():
            return args.func(args)
    except UsageError as e:
        print(f"tinymnist: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TinyMnistError as e:
        print(f"tinymnist: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tinymnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`tinymnist sweep-report ... | head`): stop quietly, as a killed pipe writer would;
        # stdout now points at devnull so that the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
