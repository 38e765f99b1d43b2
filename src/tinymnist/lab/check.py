"""Proof of the target over many seeds: train a step once per seed and judge every rule."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from ..core.config import MACHINE_FIELDS as RESOLVED  # recipe fields that "auto" resolves per machine
from ..errors import TinyMnistError
from ..fileio import read_json
from ..core.plan import checked_model
from ..models.model import count_params
from .series import teacher_recipe
from ..target import (CONFIDENCE, LAST, MAX_EPOCHS, MAX_PARAMS, RELIABLE_PASSES, RELIABLE_SEEDS, SEEDS, THRESHOLD,
                     budget_words, is_reliable, pass_rate_bound, pass_rate_words, verdict_word, within)


CHECK_FILE = "check-{step}.json"  # a step's committed test check, under results/
RATE_FILE = "check20-{step}.json"  # its pass-rate check over seeds 0..19 on test, run only after CHECK_FILE passed


@dataclass(frozen=True)
class Rule:
    text: str
    passed: bool


def verdict(params: int, epochs: int, histories: Sequence[Sequence[dict]], last: int = LAST,
            threshold: float = THRESHOLD, metric: str = "test_acc", max_params: int = MAX_PARAMS) -> list[Rule]:
    """Judge the three rules on per-seed histories (history.json lists), on `metric` (test_acc or val_acc);
    the parameter rule is "at most `max_params`" (target.py)."""
    if last < 1:
        raise TinyMnistError(f"--last must be >= 1, got {last}")
    mins = [worst_of_last(h, last, metric) for h in histories]
    complete = all(len(h) >= last for h in histories) and len(histories) > 0
    worst = min(mins) if complete else float("nan")
    what = "validation" if metric == "val_acc" else "test"
    return [
        Rule(f"parameters {params:,} {budget_words(max_params)}", within(params, max_params)),
        Rule(f"epochs {epochs} <= {MAX_EPOCHS}", epochs <= MAX_EPOCHS),
        Rule(f"every seed's last {last} {what} accuracies >= {threshold:.2f}% (worst {worst:.2f}%, "
             f"{len(histories)} seeds)", complete and worst >= threshold),
    ]


def worst_of_last(history: Sequence[dict], last: int = LAST, metric: str = "test_acc") -> float:
    """The assignment's rule as one number: the lowest `metric` of the last `last` epochs (nan if fewer ran)."""
    return min(r[metric] for r in history[-last:]) if len(history) >= last else float("nan")


def mean_of_last(history: Sequence[dict], last: int = LAST, metric: str = "test_acc") -> float:
    """The mean `metric` of the last `last` epochs (nan if fewer ran): what a screen ranks by, since one epoch's dip
    moves it less than it moves the worst."""
    return statistics.mean(r[metric] for r in history[-last:]) if len(history) >= last else float("nan")


def seed_gap(worsts_per_trial: Sequence[Sequence[float]]) -> Optional[float]:
    """The seeds' own spread, as every page states it: the mean gap between a trial's best and worst seed (each seed
    scored by its worst epoch of the rule's window), over the trials with more than one seed; None if none has."""
    gaps = [max(w) - min(w) for w in worsts_per_trial if len(w) > 1]
    return statistics.mean(gaps) if gaps else None


def top_spread(scores: Sequence[float], k: int) -> Optional[float]:
    """How close the best k scores lie: the best minus the k-th best (the last, if fewer); None for fewer than 2.
    Where it is smaller than seed_gap, the order among them is seed noise."""
    ranked = sorted(scores, reverse=True)
    return ranked[0] - ranked[min(k, len(ranked)) - 1] if len(ranked) > 1 else None


def held_out(history: Sequence[dict]) -> str:
    """The held-out metric a history carries: "test_acc" for a run on all training images, "val_acc" for a
    validation run, which never reads the test set (the test set is read once per chosen recipe)."""
    return "test_acc" if history and "test_acc" in history[-1] else "val_acc"


def held_out_line(history: list[dict]) -> str:
    """The best and last held-out accuracy of a run: test, or validation for a run that holds images out (it never
    reads the test set)."""
    metric = held_out(history)
    what, note = (("test", "") if metric == "test_acc"
                  else ("validation", " (a validation run: the test set is not read)"))
    best = max(history, key=lambda r: r[metric])
    return (f"best {what} accuracy {best[metric]:.2f}% (epoch {best['epoch']}); final {history[-1][metric]:.2f}%"
            f"{note}")


def final_accuracy_stats(histories: Sequence[Sequence[dict]], metric: str = "test_acc") -> tuple[float, float]:
    """Mean and sample standard deviation of the last epoch's accuracy over seeds."""
    finals = [h[-1][metric] for h in histories]
    return statistics.mean(finals), (statistics.stdev(finals) if len(finals) > 1 else 0.0)


def seed_passes(worsts: Sequence[float], threshold: float = THRESHOLD, fixed_rules: bool = True) -> int:
    """How many runs pass the rule on their own: a seed passes when its worst accuracy of the window holds the
    threshold and the rules that do not vary by seed (parameters, epochs) hold."""
    return sum(w >= threshold for w in worsts) if fixed_rules else 0


@dataclass(frozen=True)
class Proof:
    """One check's evidence as every page reads it, computed here once: each seed's worst accuracy of the rule's
    window, the mean and spread of the final epoch over seeds, the verdict the check recorded, and how many seeds
    pass on their own (the pass rate and its bound)."""

    seed_worsts: tuple[float, ...]
    mean: float
    std: float
    passed: bool
    last: int
    metric: str
    passes: int = 0

    @property
    def worst(self) -> float:
        return min(self.seed_worsts)

    @property
    def verdict(self) -> str:
        return verdict_word(self.passed)

    @property
    def seeds(self) -> int:
        return len(self.seed_worsts)

    @property
    def rate_bound(self) -> float:
        """The per-run pass rate's one-sided lower bound at CONFIDENCE (Clopper-Pearson)."""
        return pass_rate_bound(self.passes, self.seeds)

    @property
    def rate(self) -> str:
        """"k of n seeds pass; per-run pass rate ≥ X with 95% confidence (Clopper–Pearson)"."""
        return pass_rate_words(self.passes, self.seeds)

    @property
    def reliable(self) -> bool:
        """At least 19 of at least 20 seeds pass, on test (target.is_reliable)."""
        return self.metric == "test_acc" and is_reliable(self.passes, self.seeds)


def proof(ev: dict) -> Proof:
    """The Proof of a check's evidence (the dict that `check --json` writes); evidence older than the pass rate gets
    it from its histories and its rules."""
    metric, last = ev.get("metric", "test_acc"), ev["last"]
    histories = [s["history"] for s in ev["seeds"]]
    mean, std = final_accuracy_stats(histories, metric)
    worsts = tuple(worst_of_last(h, last, metric) for h in histories)
    fixed = all(r["passed"] for r in ev.get("rules", [])[:2])  # parameters and epochs, the same for every seed
    passes = seed_passes(worsts, ev.get("threshold", THRESHOLD), fixed)
    return Proof(worsts, mean, std, bool(ev["passed"]), last, metric, passes)


def pass_rate_record(pr: Proof) -> dict:
    """The pass rate as a check's evidence records it."""
    record = {"passes": pr.passes, "seeds": pr.seeds, "lower_bound": round(pr.rate_bound, 4),
              "confidence": CONFIDENCE, "method": "Clopper-Pearson, one-sided"}
    if pr.metric == "test_acc":
        record["reliable"] = pr.reliable
    return record


def earlier_test_looks(step_name: str, budget: int, results: str | Path = "results") -> list[str]:
    """The committed test checks of *other* steps with the same parameter budget: each an earlier look at the test
    set for that budget. Re-runs of one step's recipe (re-proving it after the arithmetic changed, or timing it)
    choose nothing and are not counted."""
    from .series import STEPS
    from ..fileio import read_json

    others = {s.name for s in STEPS if s.budget == budget and s.name != step_name}
    looks = []
    for path in sorted(Path(results).glob("check-*.json")):
        try:
            ev = read_json(path)
        except (OSError, ValueError):
            continue
        if ev.get("step") in others and ev.get("metric", "test_acc") == "test_acc" and ev["step"] not in looks:
            looks.append(ev["step"])
    return looks


def check_recipe(step, model: Optional[str] = None, models_file: Optional[str] = None,
                 overrides: Optional[dict] = None):
    """The one builder of a recipe from a step and changes, for a check, a screen's candidate, a sweep's trial and a
    grader's retraining: `step`'s recipe, for `model` when given (one of tinymnist's, a class registered with
    register_model, or with `models_file` a class of the user's models file, by default the step's model name), with
    `overrides` (flat or nested fields). Plain data: nothing is built or validated here."""
    from ..core.config import for_user_model, override
    from ..models.model import is_user_model

    base = step.config
    if models_file and model is None:
        model = base.model
    if is_user_model(model, models_file or ""):
        base = for_user_model(base, model, models_file or "")
    elif model is not None:
        base = replace(base, model=model)
    return override(base, overrides or {})


def run_check(step_name: Optional[str] = None, seeds: int = 5, last: int = LAST, data_dir: Optional[str] = None,
              device: str = "auto", out_root: str = "runs", progress: Optional[bool] = None, threads: int = 0,
              jobs: int = 0, overrides: Optional[dict] = None, results_dir: str | Path = "results",
              model: Optional[str] = None, models_file: Optional[str] = None, recipe=None,
              max_params: Optional[int] = None, reuse: Optional[dict] = None) -> dict:
    """Train a step's recipe (default: the series' answer) with seeds 0..seeds-1, `jobs` at a time; return the
    evidence object that --json writes.

    `model`, `models_file` and `overrides` make the recipe as check_recipe says; with a `val` among the overrides,
    every seed holds out that many training images and the rule is judged on validation accuracy. `recipe` (a
    TrainConfig) replaces all of that. `max_params`: the parameter rule, inclusive (default: the step's own budget
    for the step itself, the assignment's for any other model).

    `reuse`: the evidence of an earlier check of the same recipe (a screen's, over fewer seeds). Its seeds are taken
    as they are and only the others train: a seed's history is a function of the recipe, the seed, the device and the
    threads per run (the same on any number of parallel runs), so training it again would only repeat it. The
    evidence says which seeds came from where, with that check's environment."""
    from ..accel.device import pick_device
    from .series import answer, get_step
    from ..core.parallel import plan
    from ..core.runs import new_run_dir, train_many

    step = get_step(step_name) if step_name else answer()
    base = (recipe or check_recipe(step, model, models_file, overrides)).validate()
    params = count_params(checked_model(base))  # a network that cannot train fails here, before any worker starts
    metric = "val_acc" if base.val else "test_acc"
    if last > base.epochs:
        raise TinyMnistError(f"--last {last} is more than the step's {base.epochs} epochs")
    workers, per_run = plan(seeds, jobs, threads, pick_device(device).type)
    if base.user_model and not base.models_file and workers > 1:
        # a class registered in this process does not exist in a fresh worker process: train here, one at a time
        print(f"check: {base.model} is registered in this process only, so its seeds train here one after another "
              "(a models file trains in parallel)", flush=True)
        workers, per_run = plan(1, 1, threads, pick_device(device).type)
    label = step.name if base.model == step.config.model and not base.user_model else base.model
    if label == step.name and metric == "test_acc" and seeds > SEEDS:
        _may_look_again(step.name, results_dir)
    taken = _reusable(reuse, base, seeds, metric) if reuse else {}
    if taken:
        print(f"check {label}: seed(s) {', '.join(map(str, sorted(taken)))} taken from an earlier check of the same "
              f"recipe ({reuse.get('threads_per_run', '?')} thread(s) per run there)", flush=True)
    print(f"check {label}: {seeds - len(taken)} seeds to train, {workers} at a time with {per_run} thread(s) each",
          flush=True)
    runs = []
    for seed in range(seeds):
        if seed in taken:
            continue
        run_dir = new_run_dir(f"check-{label}-seed{seed}", out_root)
        run_dir.mkdir(parents=True)  # claim the name now: every seed starts within the same second
        runs.append((f"seed {seed}", replace(base, seed=seed), run_dir, f"{label}-seed{seed}"))

    def report(o) -> None:
        tail = [r[metric] for r in o.result["history"][-last:]]
        print(f"{o.label}: last {last} {metric.split('_')[0]} accuracies {', '.join(f'{a:.2f}' for a in tail)}; "
              f"min {min(tail):.2f}%  ({o.result['run_dir']})", flush=True)

    t0 = time.perf_counter()
    outcomes = train_many(runs, workers, per_run, data_dir, device, on_done=report, progress=progress,
                          desc=f"check {label}", teacher_of=teacher_recipe) if runs else []
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise TinyMnistError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(o.label for o in failed)}); "
                             "the finished runs are complete in their run directories")
    run = {"jobs": workers, "threads_per_run": per_run, "handed_out": "epochs" if workers > 1 else "runs",
           "wall_s": round(wall, 1)}
    fresh = [o.result for o in outcomes]
    if taken:
        run["reused"] = {"seeds": sorted(taken), "threads_per_run": reuse.get("threads_per_run"),
                         "wall_s": reuse.get("wall_s"), "trained": reuse.get("trained"), "env": reuse.get("env")}
    results = sorted([*fresh, *taken.values()], key=lambda r: r["seed"])
    return _evidence(step, label, base, results, last, metric, max_params, results_dir, run, fresh or None, params)


def _may_look_again(step: str, results_dir) -> None:
    """A check of a step over more than the rule's seeds is a look at test that measures a pass rate: it is run only
    for a step whose committed SEEDS-seed check passed (the look that chose it), never to choose one."""
    path = Path(results_dir) / CHECK_FILE.format(step=step)
    try:
        passed = bool(read_json(path)["passed"])
    except (OSError, ValueError, KeyError, TypeError):
        passed = False
    if not passed:
        raise TinyMnistError(f"a check of {step} over more than {SEEDS} seeds on test is run only after its {SEEDS}-seed "
                             f"check passed ({path} holds no passing check)")


def reusable_evidence(path: str | Path, device: str = "auto") -> dict:
    """An earlier check's evidence (its --json) for `run_check(reuse=...)`, read and held to this host: a history is
    a function of the recipe, the seed, the code and the kind of host (CPU model, ISA, torch build, the ops on the C kernels), so the runs of
    another kind of host are another sample and are not taken. A missing or unreadable file is one TinyMnistError."""
    from ..accel.device import pick_device
    from ..core.runs import environment

    try:
        ev = read_json(path)
        theirs = ev["env"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TinyMnistError(f"cannot reuse {path}: not a check's evidence ({e.__class__.__name__}: {e})") from None
    ours = environment(pick_device(device))
    key = lambda env: (env.get("torch"), env.get("device"), tuple(env.get("kernel_ops") or ()),
                       *(env.get("hardware", {}).get(k) for k in ("cpu_model", "isa", "torch_cpu_capability", "gpu")))
    if key(theirs) != key(ours):
        raise TinyMnistError(f"cannot reuse {path}: its runs trained on another kind of host or torch "
                             f"({theirs.get('hardware', {}).get('cpu_model')}, torch {theirs.get('torch')}), "
                             "whose histories differ from this one's for the same seed")
    return ev


def _reusable(reuse: dict, base, seeds: int, metric: str) -> dict:
    """The seeds of `reuse` (an earlier check's evidence) that this check can take as they are: {seed: result}. The
    recipe must be the same one, judged on the same held-out metric; a history must be complete."""
    from ..core.config import TrainConfig

    try:
        same = (TrainConfig.from_dict(reuse["config"]).recipe() == base.recipe()
                and reuse.get("metric", "test_acc") == metric)
        taken = {s["seed"]: s for s in reuse["seeds"] if s["seed"] < seeds}
    except (KeyError, TypeError, ValueError) as e:
        raise TinyMnistError(f"the evidence to reuse is not a check's evidence ({e.__class__.__name__}: {e})") from None
    if not same:
        raise TinyMnistError("the evidence to reuse holds another recipe, or another held-out metric, than this check")
    short = [s for s, r in taken.items() if len(r.get("history", [])) != base.epochs]
    if short:
        raise TinyMnistError(f"the evidence to reuse has incomplete histories (seed {short[0]})")
    return taken


def _evidence(step, label: str, base, results: list, last: int, metric: str, max_params: Optional[int],
              results_dir, run: dict, fresh: Optional[list] = None, params: Optional[int] = None):
    """Judge the finished runs, print the verdict, and assemble the evidence object. `fresh`: the results trained
    now (default: all), whose saved config tells what 'auto' became and the environment; with none, a reused
    check's. `params`: the model's count where building it here is not allowed (a stranger's, counted apart)."""
    from ..fileio import read_json

    params = count_params(checked_model(base)) if params is None else params
    fresh = results if fresh is None else fresh
    if fresh:
        saved = read_json(Path(fresh[0]["run_dir"]) / "config.json")
        # what 'auto' became on this machine (every seed resolves it the same way)
        trained, env = {k: saved["config"][k] for k in RESOLVED if k in saved["config"]}, saved["env"]
    else:
        trained, env = run["reused"]["trained"], run["reused"]["env"]
    histories = [r["history"] for r in results]
    budget = max_params or (step.budget if label == step.name else MAX_PARAMS)
    rules = verdict(params, base.epochs, histories, last, metric=metric, max_params=budget)
    mean, std = final_accuracy_stats(histories, metric)
    for rule in rules:
        print(f"{verdict_word(rule.passed)}  {rule.text}")
    worsts = [worst_of_last(h, last, metric) for h in histories]
    pr = Proof(tuple(worsts), mean, std, all(r.passed for r in rules), last, metric,
               seed_passes(worsts, THRESHOLD, all(r.passed for r in rules[:2])))
    print(pr.rate)
    if metric == "test_acc" and len(results) >= RELIABLE_SEEDS:
        print(f"{'RELIABLE' if pr.reliable else 'NOT RELIABLE'}  at least {RELIABLE_PASSES} of {RELIABLE_SEEDS} "
              f"seeds must pass: {pr.passes} of {len(results)} did")
    print(f"final-epoch {metric.split('_')[0]} accuracy over {len(results)} seeds: {mean:.2f} +- {std:.2f}%")
    earlier = (earlier_test_looks(step.name, step.budget, results_dir)
               if metric == "test_acc" and label == step.name else [])
    if earlier:
        print(f"this is look {len(earlier) + 1} at the test set for the {step.budget:,}-parameter budget "
              f"(earlier: {', '.join(earlier)})")
    own = {}
    if base.teacher:  # a track of its own: the teacher's epochs are stated beside the student's
        taught = teacher_recipe(base).epochs
        print(f"distilled: each seed's teacher ({base.teacher}) trained {taught} epochs before the student's "
              f"{base.epochs}, {taught + base.epochs} in all")
        own["teacher"] = {"step": base.teacher, "epochs": taught}
    if base.models_file:
        from ..models.userfile import file_sha256

        own = {"models_file": {"path": base.models_file, "sha256": file_sha256(base.models_file), "class": base.model}}
    return {"step": step.name, "label": label, "model": base.model, **own, "params": params, "epochs": base.epochs,
            "budget": budget,
            "test_look": len(earlier) + 1 if metric == "test_acc" else 0, "earlier_looks": earlier,
            **({"pass_rate_of": CHECK_FILE.format(step=step.name)}
               if metric == "test_acc" and label == step.name and len(results) > SEEDS else {}),
            "last": last, "threshold": THRESHOLD, "metric": metric, "passed": all(r.passed for r in rules),
            "rules": [{"rule": r.text, "passed": r.passed} for r in rules], "pass_rate": pass_rate_record(pr),
            "final_acc_mean": round(mean, 4), "final_acc_std": round(std, 4), **run,
            "config": base.to_dict(), "trained": trained, "env": env, "seeds": results}
