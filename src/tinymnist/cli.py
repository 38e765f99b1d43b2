"""The tinymnist command line. Every subcommand is a thin wrapper over library functions."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from .errors import TinyMnistError, UsageError, install_hint

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, and an option is spelt in full (a prefix
    such as --seed for --seeds is refused, not guessed)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Every option that several verbs take, each defined once, as an argparse parent parser; a verb lists the ones
    it takes. Defaults and choices come from the constants of the modules that own them."""
    from .core.data import ENV_VAR, default_data_dir
    from .accel.device import DEVICES

    def parent(name: str, *args, **kwargs) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(*args, **kwargs)
        return p

    return {
        "data": parent("data", "--data-dir", default=None,
                       help=f"directory holding the MNIST files (default: ${ENV_VAR}, else {default_data_dir()})"),
        "device": parent("device", "--device", default="auto", choices=DEVICES, help="where to train or run the model"),
        "threads": parent("threads", "--threads", type=_nonneg_int, default=0,
                          help="CPU threads per run (0 = the available cores, divided among the parallel runs; for "
                               "resume, the count the run recorded: the history depends on it)"),
        "jobs": parent("jobs", "--jobs", type=_nonneg_int, default=0,
                       help="runs trained at once, each in its own process (0 = one per core on a CPU, 1 on a GPU)"),
        "progress": parent("progress", "--no-progress", action="store_true", help="no progress bars"),
        "runs": parent("runs", "--runs", default="runs", help="where the run directories go"),
        "results": parent("results", "--results", default="results", help="results directory"),
        "root": parent("root", "--root", default=".",
                       help="checkout whose README.md and docs/ pages are regenerated"),
        "study": parent("study", "--study", default=None, metavar="NAME",
                        help="the Optuna study (default: for sweep, the space file's name; for sweep-report, the only "
                             "study in the storage)"),
        "model": parent("model", "--model", default=None, metavar="NAME",
                        help="the model to train with the step's recipe: one of tinymnist's (tinymnist models lists "
                             "them), or a class of --models"),
    }


def _progress(args: argparse.Namespace) -> Optional[bool]:
    """--no-progress: no bars; else bars where the output is a terminal (None lets the engine decide)."""
    return False if args.no_progress else None


def _add_models(p: argparse.ArgumentParser, what: str = "--model NAME picks one") -> None:
    p.add_argument("--models", default=None, metavar="FILE.py|NOTEBOOK.ipynb",
                   help="a Python file, or a Jupyter notebook, of your own nn.Module classes (forward: (N,1,28,28) -> "
                        f"(N,10)); from a notebook only imports, definitions and constants are run; {what}")


def _user_model(args: argparse.Namespace, name: Optional[str], flag: str = "--model") -> Optional[str]:
    """The model a command names, checked against the --models file (or tinymnist's models and registered ones);
    with a --models file and no name, its only class. An unknown name is a usage error listing the valid ones."""
    from .models.model import list_models

    if getattr(args, "models", None):
        from .models.userfile import load_models_file

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
    from .lab.check import check_recipe

    model = _user_model(args, getattr(args, "model", None))
    return check_recipe(step, model, args.models, _overrides(args, **extra)).validate()


def recipe_options() -> list:
    """The TrainConfig fields the training verbs take as --options (their metadata says cli)."""
    import dataclasses

    from .core.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")]


def _add_recipe_overrides(p: argparse.ArgumentParser) -> None:
    """Options that override single fields of a step's recipe, generated from TrainConfig's field metadata (help,
    choices, accepted values); unset ones keep the recipe's value."""
    from .accel.kernels import OPS

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
    parser = _Parser(prog="tinymnist", formatter_class=_Help,
                     description="Tiny CNNs for MNIST: train, summarise, check and use them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    shared = _shared_options()

    def verb(name: str, help: str, func, *options: str) -> argparse.ArgumentParser:
        """A subcommand that takes the shared `options`, by name, after its own."""
        p = sub.add_parser(name, help=help, formatter_class=_Help, parents=[shared[o] for o in options])
        p.set_defaults(func=func)
        return p

    _add_model_verbs(verb)
    _add_series_verbs(verb)
    _add_use_verbs(verb)
    return parser


def _add_model_verbs(verb) -> None:
    """The verbs about models and training one: models, summary, train, resume, experiments."""
    from .lab.series import ANSWER_WHY, answer, step_names
    from .models.model import list_models

    p = verb("models", "list the models and their parameter counts", cmd_models)
    _add_models(p, "list its models instead of tinymnist's")

    p = verb("summary", "per-layer shapes, parameters, receptive field and MACs", cmd_summary)
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(list_models())}; or a class of --models")
    _add_models(p, "MODEL names one of its classes")

    p = verb("train", "train a step's recipe (default: the series' answer) and write a run directory", cmd_train,
             "model", "progress", "data", "device", "threads")
    p.add_argument("--step", choices=step_names(), default=None, metavar="STEP",
                   help=f"experiment step whose recipe to train (one of: {', '.join(step_names())}; "
                        f"default: {answer().name}, {ANSWER_WHY})")
    _add_models(p)
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seeds every RNG")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>-<timestamp>/)")
    _add_recipe_overrides(p)

    p = verb("resume", "continue a stopped run (Ctrl-C, a crash) from its last finished epoch", cmd_resume,
             "progress", "data", "threads")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory that train, check or reproduce wrote")
    _add_models(p, "needed to resume a run of one of its models (the file the run recorded, unchanged)")

    verb("experiments", "the experiment series, one line per step", cmd_experiments)


def _add_series_verbs(verb) -> None:
    """The verbs about the series and its evidence: reproduce, report, check, screen, sweep, sweep-report."""
    from .lab.series import ANSWER_WHY, answer, step_names
    from .lab.space import HEARTBEAT, SPACE_FORMAT
    from .target import LAST, MAX_PARAMS, SEEDS, budget_words

    p = verb("reproduce", "train the steps, write results/ and regenerate the README and docs/", cmd_reproduce,
             "results", "root", "runs", "progress", "jobs", "data", "device", "threads")
    p.add_argument("--only", nargs="+", choices=step_names(), metavar="STEP", default=None,
                   help=f"train only these steps (default: all of {', '.join(step_names())})")

    verb("report", "regenerate the generated sections of the README and docs/ from results/ (no training)",
         cmd_report, "results", "root")

    p = verb("check", "train a step (or your model, with its recipe) with seeds 0..N-1 and judge the target rules",
             cmd_check, "model", "runs", "progress", "jobs", "data", "device", "threads")
    p.add_argument("step", nargs="?", choices=step_names(), default=None, metavar="STEP",
                   help=f"one of: {', '.join(step_names())} (default: {answer().name}, {ANSWER_WHY}); its recipe "
                        "trains --model when given")
    _add_models(p)
    p.add_argument("--max-params", type=_positive_int, default=None, metavar="N",
                   help="the parameter rule: at most N parameters (default: the step's own budget; for --model, "
                        f"the assignment's, {budget_words(MAX_PARAMS)})")
    p.add_argument("--seeds", type=_positive_int, default=SEEDS, help="number of seeds, 0..N-1")
    p.add_argument("--last", type=_positive_int, default=LAST, help="epochs at the end that must all pass")
    p.add_argument("--json", default=None, metavar="FILE", help="write the evidence (histories, verdict) here")
    p.add_argument("--reuse", default=None, metavar="FILE.json",
                   help="an earlier check of the same recipe on a host of the same kind (its --json): its seeds are "
                        "taken as they are and only the others train, e.g. a 20-seed check after the 5-seed one")
    p.add_argument("--markdown", default=None, metavar="FILE.md",
                   help="write a report card to paste into a README: the model's summary, the rule and the verdict, "
                        "each seed's last accuracies and the proof plot")
    _add_recipe_overrides(p)

    p = verb("grade", "grade a class: each submission's own log judged by the rules, its claim checked, its models "
                      "built apart in a child process with limits; --retrain N checks them with our recipe",
             cmd_grade, "runs", "progress", "jobs", "data", "device", "threads")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a notebook, a models file, a submission's folder, or a folder of submission folders")
    p.add_argument("--markdown", default=None, metavar="FILE.md",
                   help="write the class table here, and a card per row in the folder of the same name")
    p.add_argument("--csv", default=None, metavar="FILE.csv", help="write the class table here as CSV")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="wall-clock seconds a file's child may take to load and build its models")
    p.add_argument("--memory", type=_positive_int, default=2048, metavar="MB",
                   help="memory a file's child (or a retraining worker) may take beyond what it starts with")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--retrain", type=_positive_int, default=0, metavar="N",
                   help="check the graded model of every row that passes its own log with our recipe over seeds "
                        "0..N-1 (resumable: the same command goes on where it stopped)")
    g.add_argument("--retrain-all", type=_positive_int, default=0, metavar="N",
                   help="the same for every row with a graded model")
    p.add_argument("--state", default="grading", metavar="DIR",
                   help="where retraining keeps its runs and evidence, so that a stopped grading resumes")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="an Optuna RDB URL (postgresql://...): each (submission, seed) run is a trial of one study, "
                        "and every machine that runs the same command with it takes the next run")
    p.add_argument("--heartbeat", type=_positive_int, default=HEARTBEAT, metavar="SECONDS",
                   help="a retraining run's heartbeat; one silent for twice this is failed and queued again")
    _add_recipe_overrides(p)

    p = verb("screen", "screen named candidates on validation, confirm the best over 5 validation seeds, and say "
                       "which earned a look at test", cmd_screen,
             "results", "runs", "progress", "jobs", "data", "device", "threads")
    p.add_argument("file", metavar="SCREEN.toml", help="the base step and its candidates (format: docs/searches.md); "
                                                        "evidence goes to <results>/screen-<name>/")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: write screen.json from the evidence already there, to commit a running "
                        "screen's progress")

    p = verb("sweep", f"search recipes on validation with Optuna (needs {install_hint('sweep')})", cmd_sweep,
             "study", "jobs", "data", "device", "threads")
    p.add_argument("space", metavar="SPACE.toml", help=f"the search space: {SPACE_FORMAT}")
    p.add_argument("--trials", type=_positive_int, required=True,
                   help="complete trials the study should hold; the same command again resumes it")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage, e.g. postgresql://user:pass@host/db for workers on several machines "
                        "(default: sqlite in --out)")
    p.add_argument("--out", default="sweeps", help="directory for the SQLite study and every trial's run directory")
    p.add_argument("--heartbeat", type=_positive_int, default=HEARTBEAT, metavar="SECONDS",
                   help="a running trial's heartbeat; one silent for twice this is marked failed and queued again")
    _add_models(p, "the space's model (fixed or searched) names its classes")

    p = verb("sweep-report", "the best trials of a study, and its plots", cmd_sweep_report, "study")
    p.add_argument("target", metavar="DIR_OR_STORAGE", help="a sweep's --out directory, or a storage URL")
    p.add_argument("--top", type=_positive_int, default=10, help="how many trials to list")
    p.add_argument("--show-test", action="store_true",
                   help="also show the test accuracy that trials recorded before validation runs stopped reading "
                        "the test set (newer trials have none)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write the optimisation history and parameter importances here (default: the sweep's "
                        "directory, or the current one for a URL)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every complete trial as JSON (an audit trail)")


def _add_use_verbs(verb) -> None:
    """The verbs that use a trained model, and the benchmark: errors, demo, predict, export, bench."""
    from .accel.device import PRECISIONS
    from .apps.demo import DEFAULT_PORT
    from .lab.series import answer

    p = verb("errors", "the test images a checkpoint gets wrong: a picture grid, the confusion matrix and errors.json",
             cmd_errors, "data", "device")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write (default: the checkpoint's directory; for the model shipped in the package, "
                        "./errors-shipped/, never the package itself)")
    _add_models(p, "needed for a checkpoint of one of its models")

    p = verb("demo", "a local web page: draw a digit and see what the model says", cmd_demo)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a run's model.pt (default: your newest run of the answer's recipe under runs/, else the answer "
                        "trained and shipped in the package)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: only this machine)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port (0 = any free one)")
    _add_models(p, "needed for a checkpoint of one of its models")

    p = verb("predict", "classify digits in image files with a trained model", cmd_predict, "device")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt, or an .onnx file from export")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, BMP, GIF, TIFF, WebP ... any size or mode")
    _add_models(p, "needed for a model.pt of one of its models (never for .onnx)")
    p.add_argument("--top", type=_top_k, default=3, help="how many of the most likely digits to show (1-10)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")

    p = verb("export", f"export a trained model to ONNX (needs {install_hint('onnx')})", cmd_export)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's model.pt")
    p.add_argument("--onnx", required=True, metavar="OUT", help="where to write the .onnx file")
    _add_models(p, "needed for a checkpoint of one of its models; the .onnx file needs it no more")

    p = verb("bench", "throughput: our pipeline vs the classic DataLoader pipeline vs the bare model", cmd_bench,
             "model", "data", "device", "threads")
    p.add_argument("--steps", type=_positive_int, default=60, help="timed training steps per repeat")
    p.add_argument("--repeats", type=_positive_int, default=3, help="repeats per pipeline; the median is reported")
    p.add_argument("--batch-size", type=_positive_int, default=answer().config.batch_size, help="batch size")
    p.add_argument("--workers", type=_nonneg_int, default=2, help="DataLoader workers of the classic pipeline")
    p.add_argument("--no-epoch", action="store_true", help="skip timing one full epoch plus a test pass")
    p.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                   help="precision of the training step, the same for all pipelines but plain (always fp32)")
    p.add_argument("--concurrency", type=float, default=6.0, metavar="SECONDS",
                   help="time window of the concurrent-process measurements (0 skips them)")
    p.add_argument("--train-runs", type=_nonneg_int, default=0,
                   help="also time N complete `tinymnist train` runs of the default recipe (minutes each)")
    p.add_argument("--small-batches", action="store_true",
                   help="instead: the model step of final (Model_7) and the answer at batches 32, 64 and 128, at 1 "
                        "thread and at --threads threads (default: every core), its kernels layer by layer (before) "
                        "and as one program (after), each against the matrix-multiply peak")
    p.add_argument("--layers", action="store_true",
                   help="instead: where a step of the answer (or --model) at --batch-size goes, layer by layer, "
                        "forward and backward, at 1 thread and at --threads threads, against the matrix-multiply "
                        "peak")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures and ratios here")


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from .models.model import count_params, create_model, list_models

    if args.models:
        from .models.userfile import check_forward, load_models_file

        found = load_models_file(args.models)
        built = {name: found.build(name) for name in found.classes}
        for name, model in built.items():
            check_forward(model, name, args.models)
    else:
        built = {name: create_model(name) for name in list_models()}
    for name, model in built.items():
        print(f"{name:<10}{count_params(model):>9,} params  {_first_sentence(type(model).__doc__)}".rstrip())
    if args.models:
        for name, why in found.skipped.items():
            print(f"{name:<10}  skipped: {why}")
        for line in found.notebook.lines() if found.notebook else []:
            print(line)
    return 0


def _first_sentence(doc: Optional[str]) -> str:
    """A docstring's first sentence, whole, on one line."""
    text = " ".join((doc or "").split())
    head, dot, _ = text.partition(". ")
    return head + dot.strip()


def cmd_summary(args: argparse.Namespace) -> int:
    from .core.config import TrainConfig
    from .core.plan import checked_model
    from .models.summary import format_summary, summarize

    name = _user_model(args, args.model, "MODEL")
    print(format_summary(summarize(checked_model(TrainConfig(model=name, models_file=args.models or ""))), title=name))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .lab.check import held_out_line
    from .lab.series import ANSWER_WHY, answer, get_step, teacher_recipe
    from .core.plan import checked_model
    from .core.runs import train_run
    from .models.model import count_params

    step = get_step(args.step) if args.step else answer()
    cfg = _recipe_for(step, args, seed=args.seed)
    name = step.name if cfg.model == step.config.model and not cfg.user_model else cfg.model
    size = f"{count_params(checked_model(cfg)):,} parameters, seed {cfg.seed}"  # a bad network fails before data loads
    if name == step.name:
        why = f"the answer: {ANSWER_WHY}" if step is answer() else "chosen with --step"
        print(f"training step {step.name} ({cfg.model}, {size}): {why}", flush=True)
    else:
        source = f" from {args.models}" if args.models else ""
        print(f"training {cfg.model}{source} ({size}) with the recipe of step {step.name}", flush=True)
    run_dir, history = train_run(cfg, out=args.out, data_dir=args.data_dir, device=args.device, name=name,
                                 progress=_progress(args), threads=args.threads,
                                 teacher=teacher_recipe(cfg) if cfg.teacher else None)
    print(f"{held_out_line(history)}; run directory: {run_dir}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from .lab.check import held_out_line
    from .core.runs import resume_run

    run_dir, history = resume_run(args.run_dir, data_dir=args.data_dir, threads=args.threads, models=args.models,
                                  progress=_progress(args))
    print(f"{held_out_line(history)} after epoch {history[-1]['epoch']}; run directory: {run_dir}")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from .lab.series import STEPS

    width = max(len(s.name) for s in STEPS) + 2
    for s in STEPS:
        params = s.config.build_model().num_params()
        print(f"{s.name:<{width}}{s.config.model:<9}{params:>8,} params  {s.config.epochs:>2} epochs  {s.heading}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .lab.reproduce import reproduce
    from .pages.report import update_and_say

    failed = reproduce(args.only, args.results, args.runs, jobs=args.jobs, threads=args.threads,
                       data_dir=args.data_dir, device=args.device, progress=_progress(args))
    update_and_say(args.root, args.results)
    if failed:
        from .lab.series import step_names

        raise TinyMnistError(f"{len(failed)} of {len(args.only or step_names())} steps failed: {', '.join(failed)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .pages.report import regenerate

    regenerate(args.results, args.root)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .lab.check import reusable_evidence, run_check
    from .lab.series import answer, get_step
    from .fileio import write_json
    from .pages.plots import plot_proof
    from .core.runs import new_run_dir

    step = get_step(args.step) if args.step else answer()
    cfg = _recipe_for(step, args)
    reuse = reusable_evidence(args.reuse, args.device) if args.reuse else None
    evidence = run_check(step.name, args.seeds, args.last, data_dir=args.data_dir, device=args.device,
                         out_root=args.runs, progress=_progress(args), threads=args.threads,
                         jobs=args.jobs, recipe=cfg, max_params=args.max_params, reuse=reuse)
    if args.reuse:  # where the earlier evidence is, from the folder this evidence is written to
        evidence["reused"]["file"] = Path(os.path.relpath(args.reuse, Path(args.json or ".").resolve().parent)).as_posix()
    if args.json:
        write_json(args.json, evidence)
        print(f"evidence written to {args.json}")
    beside = args.json or args.markdown  # the proof plot goes beside the evidence, or the card, or in runs/
    plot = (Path(beside) if beside else new_run_dir(f"check-{evidence['label']}", args.runs)).with_suffix(".png")
    plot_proof(evidence, plot)
    print(f"proof plot written to {plot}")
    if args.markdown:
        from .fileio import atomic_path
        from .apps.card import render_card
        from .models.summary import summarize

        with atomic_path(args.markdown) as tmp:
            tmp.write_text(render_card(evidence, Path(args.markdown), plot, summarize(cfg.build_model())) + "\n")
        print(f"report card written to {args.markdown}")
    return 0 if evidence["passed"] else 1


def cmd_grade(args: argparse.Namespace) -> int:
    from .apps.grade import grade, timing_line, write_outputs
    from .models.sandbox import Limits

    t0 = time.perf_counter()
    rows = grade(args.paths, Limits(seconds=args.timeout, memory_mb=args.memory))
    graded = time.perf_counter() - t0
    evidence = {}
    seeds = args.retrain or args.retrain_all
    if seeds:
        from .apps.retrain import retrain

        evidence = retrain(rows, seeds, everyone=bool(args.retrain_all), state=args.state, jobs=args.jobs,
                           threads=args.threads, data_dir=args.data_dir, device=args.device, storage=args.storage,
                           memory_mb=args.memory, progress=_progress(args), overrides=_overrides(args),
                           heartbeat=args.heartbeat)
    timing = timing_line(rows, graded, args.timeout)
    for path in write_outputs(rows, args.markdown, args.csv, evidence, timing):
        print(f"written: {path}")
    print(f"{timing}: {sum(r.verdict == 'PASS' for r in rows)} pass on their own log")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .lab.sweep import format_report, run_sweep

    summary = run_sweep(args.space, args.trials, jobs=args.jobs, storage=args.storage, study=args.study, out=args.out,
                        data_dir=args.data_dir, device=args.device, threads=args.threads, heartbeat=args.heartbeat,
                        models_file=args.models)
    print(format_report(summary, top=5))
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from .lab.screen import run_screen

    run_screen(args.file, args.results, jobs=args.jobs, threads=args.threads, data_dir=args.data_dir,
               device=args.device, runs=args.runs, progress=_progress(args), train=not args.no_train)
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fileio import write_json
    from .lab.sweep import format_report, load_study, plot_study, resolve_storage, summarize_study

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
    from .apps.misclassified import CONFUSION_FILE, ERRORS_FILE, GRID_FILE, run_errors

    out, result = run_errors(args.checkpoint, args.out, args.data_dir, args.device, models=args.models)
    print(f"{result['errors']} of {result['test_images']:,} test images misclassified "
          f"(test accuracy {result['test_acc']:.2f}%); wrote {out / ERRORS_FILE}, {out / GRID_FILE}, "
          f"{out / CONFUSION_FILE}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import serve

    serve(args.checkpoint, args.host, args.port, models=args.models)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    import torch

    from .accel.device import pick_device
    from .apps.predict import ImageError, classify, load_classifier, load_image

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
    from .apps.export import export_onnx
    from .core.runs import load_checkpoint

    model, cfg = load_checkpoint(args.checkpoint, models=args.models)
    path = export_onnx(model, args.onnx)
    print(f"wrote {path} ({cfg.model}; input 'image' (N, 1, 28, 28) normalised, output 'logits' (N, 10))")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .apps.bench import run_bench
    from .core.data import load_mnist
    from .accel.device import configure_threads, pick_device
    from .lab.series import answer
    from .fileio import write_json

    model = _user_model(args, args.model)
    device = pick_device(args.device)
    threads = configure_threads(args.threads)
    cfg = replace(answer().config, batch_size=args.batch_size, precision=args.precision)
    data = load_mnist(args.data_dir, device=device)
    if args.layers:
        from .apps.bench import layer_rows

        result = layer_rows(data, model or cfg.model, cfg, model or answer().name, batch_size=args.batch_size,
                            thread_counts=tuple(sorted({1, threads})), steps=args.steps, repeats=args.repeats)
        if args.json:
            write_json(args.json, result)
            print(f"results written to {args.json}")
        return 0
    if args.small_batches:
        from .apps.bench import small_batch_rows
        from .lab.series import get_step

        recipes = {"final": (get_step("final").config.model, get_step("final").config),
                   (model or answer().name): (model or cfg.model, answer().config)}
        result = small_batch_rows(data, recipes, threads=threads, steps=args.steps, repeats=args.repeats)
        if args.json:
            write_json(args.json, result)
            print(f"results written to {args.json}")
        return 0
    result = run_bench(data, model or cfg.model, cfg, steps=args.steps, repeats=args.repeats,
                       epoch=not args.no_epoch, workers=args.workers, data_dir=args.data_dir,
                       concurrency=args.concurrency)
    if args.train_runs:
        from .apps.bench import time_training

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
