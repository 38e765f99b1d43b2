"""docs/series.md: every step with its Target, Result and Analysis, the numbers read from results/ and the prose from
lab/steps/, with its placeholders filled."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from ..lab.check import CHECK_FILE, RATE_FILE, proof
from ..core.data import TEST_IMAGES, TRAIN_IMAGES
from ..errors import TinyMnistError
from ..lab.series import STEPS, Step, answer
from ..fileio import read_json
from ..models.summary import format_summary, summarize
from ..target import LAST, RELIABLE_PASSES, RELIABLE_SEEDS
from .common import FIRST_CHECK, NOTE, NOT_CONFIRMED, RESULTS, _anchor, hardware_text, markers, recipe_words, seconds_per_epoch, step_result
from .records import Records
from .render import proof_lines, render_template
from .searches import YARDSTICK, _space_fixed


def replot(step: Step, results: Path = RESULTS) -> None:
    """Redraw results/<step>/curves.png from its history.json, so every plot has the current style."""
    from ..core.curves import plot_curves

    d = results / step.name
    meta = read_json(d / "config.json")
    plot_curves(read_json(d / "history.json"), d / "curves.png",
                title=f"{step.name} ({meta['model']}, {meta['params']:,} params)",
                averaged=bool(meta["config"].get("ema")))


START, END = markers("experiments")


def _log_table(history: list[dict]) -> str:
    rows = ["| epoch | train loss | train acc | test loss | test acc | LR | seconds |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in history:
        rows.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.2f}% | {r['test_loss']:.4f} | "
                    f"{r['test_acc']:.2f}% | {r['lr']:.2e} | {r['seconds']:.1f} |")
    return "\n".join(rows)


def _check_section(step: Step, results: Path) -> list[str]:
    """A step's 5-seed test check, its pass-rate check over seeds 0..19 (run after the 5-seed check passed: a further
    look at test that chooses nothing, only measures how often a run of the recipe passes), and what it gets wrong."""
    r = Records(results)
    check_file, rate_file = CHECK_FILE.format(step=step.name), RATE_FILE.format(step=step.name)
    check, rate = r.json(check_file), r.json(rate_file)
    if check is None:
        return []

    def lines(ev: dict, path: Path, alt: str, extra=()) -> list[str]:
        plot = f"results/{path.with_suffix('.png').name}" if path.with_suffix(".png").is_file() else None
        return proof_lines(ev, plot, alt, extra=extra)

    text = render_template(
        "check_sections.md.j2", step=step.name, check=check, check_file=check_file,
        check_verdict=proof(check).verdict, rate=rate, rate_file=rate_file, reliable_passes=RELIABLE_PASSES,
        reliable_seeds=RELIABLE_SEEDS,
        check_lines=lines(check, results / check_file, f"proof over seeds: {step.name}",
                          _selection_lines(step, check, results)),
        rate_lines=lines(rate, results / rate_file, f"pass rate over {len(rate['seeds'])} seeds: {step.name}")
        if rate else [])
    return text.rstrip("\n").split("\n") + [""] + _errors_section(step, results)


def _screened_lines(step: Step, ev: dict, results: Path) -> list[str]:
    """The 5-seed validation check that earned a screened step its look at test, beside the yardstick's and the test
    check that followed."""
    screen, cand = step.screened_by
    d = results / f"screen-{screen}"
    path = d / f"confirm-{cand}.json"
    if not path.is_file():
        raise TinyMnistError(f"step {step.name!r} was earned by candidate {cand!r} of screen {screen!r}, but {path} "
                             "is missing")
    val, k = proof(read_json(path)), ev["last"]

    def split(evidence: dict) -> str:  # each check's own held-out size, as its evidence records it
        held = evidence["config"]["val"]
        return f"{TRAIN_IMAGES - held:,} ({held:,} held out) | the {held:,} held-out training images"

    rows = [f"| validation: candidate `{cand}` of screen `{screen}`, confirmed | {split(read_json(path))} | "
            f"{len(val.seed_worsts)} | {val.worst:.2f}% (mean {statistics.mean(val.seed_worsts):.2f}%) |"]
    yard = results / YARDSTICK
    if yard.is_file():
        y = proof(read_json(yard))
        rows.append(f"| validation bar: `{read_json(yard)['step']}` (`results/{YARDSTICK}`) | {split(read_json(yard))} "
                    f"| {len(y.seed_worsts)} | {y.worst:.2f}% (mean {statistics.mean(y.seed_worsts):.2f}%) |")
    return ["", "Earned on validation, confirmed on test once:", "",
            f"| evidence | trained on | judged on | seeds | worst of the last {k} epochs |",
            "| --- | --- | --- | ---: | ---: |", *rows,
            f"| test: this check | all {TRAIN_IMAGES:,} | the {TEST_IMAGES:,} test images | {len(ev['seeds'])} | "
            f"{proof(ev).worst:.2f}% (mean {statistics.mean(proof(ev).seed_worsts):.2f}%) |"]


def _selection_lines(step: Step, ev: dict, results: Path) -> list[str]:
    """The validation result that chose a searched step's recipe, beside the test result that confirmed it."""
    if step.screened_by is not None:
        return _screened_lines(step, ev, results)
    if step.chosen_by is None:
        return []
    study, number = step.chosen_by
    path = results / f"sweep-{study}" / "trials.json"
    if not path.is_file():
        raise TinyMnistError(f"step {step.name!r} was chosen by study {study!r}, but {path} is missing")
    t = read_json(path)
    row = next((r for r in t["trials"] if r["trial"] == number), None)
    if row is None:
        raise TinyMnistError(f"{path} has no complete trial {number}, which chose step {step.name!r}")
    held = _space_fixed(results, study).get("val", 0)
    k = ev["last"]
    worst_test = proof(ev).worst
    searches = step.searches or (study,)  # the searches behind this step, all judged on the same budget
    every = [r["objective"] for q in searches for r in read_json(results / f"sweep-{q}" / "trials.json")["trials"]]
    rank = 1 + sum(v > row["objective"] for v in every)
    among = (f"the {len(every)} complete trials of `{study}`" if searches == (study,) else
             f"the {len(every)} complete trials of its searches: " + ", ".join(f"`{q}`" for q in searches))
    seeds = len(row["val_worst"])
    return ["", "Chosen on validation, confirmed on test once:", "",
            f"| evidence | trained on | judged on | seeds | worst of the last {k} epochs |",
            "| --- | --- | --- | ---: | ---: |",
            f"| validation: trial {number} of `{study}` (rank {rank} of {among}) | "
            f"{60000 - held:,} ({held:,} held out) | the {held:,} held-out training images | {seeds} | "
            f"{row['objective']:.2f}% |",
            f"| test: this check | all {TRAIN_IMAGES:,} | the {TEST_IMAGES:,} test images | {len(ev['seeds'])} | "
            f"{worst_test:.2f}% |"]


def _errors_section(step: Step, results: Path) -> list[str]:
    """The misclassified grid and confusion matrix of a step's committed checkpoint evaluation."""
    from ..core.runs import CONFUSION_FILE, ERRORS_FILE, GRID_FILE

    d = results / step.name / "errors"
    if not (d / ERRORS_FILE).is_file():
        return []
    e = read_json(d / ERRORS_FILE)
    # the evaluated run's config.json and history.json: beside errors.json, or the step's committed run above it
    where = next((p for p in (d, results / step.name) if (p / "config.json").is_file()), None)
    run = read_json(where / "config.json") if where else {}
    pairs = {}
    for m in e["misclassified"]:
        pairs[(m["true"], m["predicted"])] = pairs.get((m["true"], m["predicted"]), 0) + 1
    common = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    rel = f"results/{step.name}/errors"  # as the README links it, wherever results/ was read from
    # the checkpoint as a reader can name it: runs/ is not committed, so a run's path becomes its placeholder; so
    # does the shipped model's path once another step is the answer (the package now ships that step's run)
    parts = Path(e["checkpoint"]).parts
    shipped = parts[:3] == ("src", "tinymnist", "assets")
    by_name = parts[:1] == ("runs",) or (shipped and step.name != answer().name)
    shown = "runs/<run>/model.pt" if by_name else e["checkpoint"]
    about = (f" (run `{run.get('name')}`, seed {run.get('seed')}, trained on {hardware_text(run.get('env', {}))})"
             if run else "")
    return [f"#### What `{step.name}` gets wrong", "",
            f"`tinymnist errors {shown} --out <dir>`{about} misclassifies **{e['errors']}** of "
            f"{e['test_images']:,} test images (test accuracy {e['test_acc']:.2f}%). The most frequent confusions: "
            + ", ".join(f"{t}→{p} ({n}×)" for (t, p), n in common) + f". Every error is listed in "
            f"`{rel}/{ERRORS_FILE}`" + (f"; the run's `config.json` and `history.json` are in "
                                         f"`results/{where.relative_to(results).as_posix()}`" if where else "")
            + ".", "",
            f"![misclassified: {step.name}]({rel}/{GRID_FILE})", "",
            f"![confusion matrix: {step.name}]({rel}/{CONFUSION_FILE})", ""]


def render(results: Path = RESULTS) -> str:
    """The whole generated experiments section, as Markdown."""
    res = {s.name: step_result(s, results) for s in STEPS}
    out = [START, NOTE, "", "## The series", "",
           "Each step changes one thing, states its **Target** before it runs, and reads its **Result** from the "
           "run it wrote under `results/<step>/`. `tinymnist reproduce` reruns every step and regenerates this "
           "section; `tinymnist report` regenerates it from `results/` alone.", "",
           "| step | model | parameters | MACs per image | s per epoch | best train acc | best test acc | "
           f"min of last {LAST} test accs |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in STEPS:
        r = res[s.name]
        macs = summarize(s.config.build_model()).macs
        if r is None:
            params = s.config.build_model().num_params()
            out.append(f"| [{s.name}](#{_anchor(s.heading)}) | {s.config.model} | {params:,} | {macs:,} | not run | "
                       "not run | not run | not run |")
        else:
            out.append(f"| [{s.name}](#{_anchor(s.heading)}) | {r['model']} | {r['params']:,} | {macs:,} | "
                       f"{seconds_per_epoch([r['history']]):.1f} | {r['best_train']:.2f}% | {r['best_test']:.2f}% | "
                       f"{r['min_last']:.2f}% |")
    out += ["", "Seconds per epoch are the median over the run's epochs (training plus the test pass), as the run "
                "recorded them, on the machine and thread count its `config.json` names; runs that shared a machine "
                "with others are slower. (The README's frontier table takes the same median over every epoch of a "
                "check's seeds, so a step's two numbers differ by what its seeds and hosts differ.) MACs "
                "count one forward pass. The searches that chose the later recipes are on "
                "[the searches page](docs/searches.md).", ""]
    for s in STEPS:
        r = res[s.name]
        model = s.config.build_model()
        summ = summarize(model)
        out += [f"### {s.heading}", "", f"**Target.** {fill(s.target, s, results)}", ""]
        out += [f"**Recipe.** `{s.config.model}`, {recipe_words(s.config, model.dropout, model.activation)}. "
                f"Run it with `tinymnist train --step {s.name}`.", ""]
        if r is None:
            out += ["**Result.** Not run yet.", ""]
        else:
            out += [f"**Result.** {r['params']:,} parameters (receptive field {summ.rf}×{summ.rf}); "
                    f"best train accuracy {r['best_train']:.2f}%, best test accuracy {r['best_test']:.2f}%; "
                    f"last {LAST} test accuracies {', '.join(f'{a:.2f}' for a in r['last'])} "
                    f"(min {r['min_last']:.2f}%); {r['seconds']:.0f} s of training and evaluation on "
                    f"{r['meta']['env']['device']}"
                    + (f" (this is the `{r['meta']['name']}` run of the multi-seed check)"
                       if r["meta"].get("name") != s.name else "") + ".", "",
                    f"![{s.name} curves](results/{s.name}/curves.png)", "",
                    "<details><summary>Epoch-by-epoch log</summary>", "", _log_table(r["history"]), "", "</details>",
                    ""]
        out += ["<details><summary>Model summary</summary>", "", "```text",
                format_summary(summ, title=s.config.model), "```", "", "</details>", ""]
        if s.analysis:
            out += [f"**Analysis.** {fill(s.analysis, s, results)}", ""]
        out += _check_section(s, results)  # the proof over seeds, beside its step
    out += _negative_screens(results)
    out.append(END)
    return "\n".join(out)


def _negative_screens(results: Path) -> list[str]:
    """The screens that earned no look at test (no step came of them): negative results, on this page too."""
    screens = [sc for sc in Records(results).screens() if not sc.earned]
    text = render_template("negative_screens.md.j2", screens=screens, last=LAST).strip("\n")
    return [text, ""] if text else []


# A step's prose (steps/<name>.md) types no number that results/ holds: it names the number, and this fills it in.
# A name is [STEP.]what, STEP defaulting to the step whose prose it is:
#   check.worst, check.mean, check.std    its 5-seed test check: the worst seed's worst epoch, final mean and spread
#   check.seeds, check.passing            how many seeds the check trained, and how many held the rule
#   check.seed_worsts                     each seed's worst epoch, in seed order
#   params, free                          the step's parameter count, and how many its budget leaves free
#   diff.OTHER                            how many parameters the step has more (or fewer) than step OTHER
#   study.NAME.complete / .all / .second  a committed study's complete trials, all its trials, its second best
#   check.mean_worst                      the mean over the check's seeds of each seed's worst epoch
#   check.bound, check.commit             the pass rate's 95% lower bound; the commit the check trained at
#   rate.*, first.*                       the same of the 20-seed pass-rate check (RATE_FILE), and of the first
#                                         check that a re-check at a later commit replaced (results/STEP/FIRST_CHECK)
#   screened.worst, screened.mean_worst   the worst seed's worst epoch, and the mean of the seeds' worsts, of the
#                                         5-seed validation check that earned the step its look
#   screen.NAME.CAND.worst / .mean_worst  the same two of a screen's confirmation of candidate CAND
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")


def fill(text: str, step: Step, results: Path = RESULTS) -> str:
    """`text` with every {placeholder} replaced by the number results/ holds; an unknown name is an error."""
    return PLACEHOLDER.sub(lambda m: _fact(m.group(1), step, results), text)


def _fact(name: str, step: Step, results: Path) -> str:
    from ..lab.series import get_step, step_names

    parts = name.split(".")
    if parts[0] == "study" and len(parts) == 3 and parts[2] in ("complete", "all", "second"):
        if not (results / f"sweep-{parts[1]}" / "trials.json").is_file():
            return "[not searched yet]"
        t = read_json(results / f"sweep-{parts[1]}" / "trials.json")
        values = sorted((r["objective"] for r in t["trials"]), reverse=True)
        facts = {"complete": str(len(values)), "all": str(sum(t["counts"].values())),
                 "second": f"{values[1]:.2f}%" if len(values) > 1 else "—"}
        if parts[2] in facts:
            return facts[parts[2]]
    if parts[0] == "screen" and len(parts) == 4 and parts[3] in ("worst", "mean_worst"):
        return _confirmed(results, parts[1], parts[2], parts[3])
    if parts[0] in step_names():
        step, parts = get_step(parts[0]), parts[1:]
    if len(parts) == 2 and parts[0] == "screened" and parts[1] in ("worst", "mean_worst") and step.screened_by:
        return _confirmed(results, *step.screened_by, parts[1])
    if parts == ["params"]:
        return f"{step.config.build_model().num_params():,}"
    if len(parts) == 2 and parts[0] == "diff" and parts[1] in step_names():
        other = get_step(parts[1]).config.build_model().num_params()
        return f"{abs(step.config.build_model().num_params() - other):,}"
    if parts == ["free"]:
        return f"{step.budget - step.config.build_model().num_params():,}"
    check_facts = ("worst", "mean", "std", "seeds", "passing", "seed_worsts", "mean_worst", "bound", "commit")
    checks = {"check": results / CHECK_FILE.format(step=step.name),  # its 5-seed test check
              "rate": results / RATE_FILE.format(step=step.name),  # its pass-rate check over 20 seeds
              "first": results / step.name / FIRST_CHECK}  # its first check, where a re-check replaced it
    if len(parts) == 2 and parts[0] in checks and parts[1] in check_facts:
        path = checks[parts[0]]
        if not path.is_file():  # a results/ without the check (a fresh reproduce): the prose says so
            return "[not checked yet]"
        ev = read_json(path)
        pr = proof(ev)
        facts = {"worst": f"{pr.worst:.2f}%", "mean": f"{pr.mean:.2f}%", "std": f"{pr.std:.2f}",
                 "mean_worst": f"{statistics.mean(pr.seed_worsts):.3f}%", "bound": f"{pr.rate_bound:.2f}",
                 "seeds": str(len(pr.seed_worsts)), "passing": str(pr.passes),
                 "seed_worsts": ", ".join(f"{w:.2f}%" for w in pr.seed_worsts),
                 "commit": (ev.get("env", {}).get("git_commit") or "?")[:7]}
        return facts[parts[1]]
    raise TinyMnistError(f"steps/{step.name}.md: no number {{{name}}} in results/ (see pages/series_page.PLACEHOLDER)")


def _confirmed(results: Path, screen: str, candidate: str, what: str) -> str:
    """`what` (worst, or mean_worst) of a screen's 5-seed validation check of one candidate, as the gate read it."""
    from ..lab.screen import summarize_evidence

    path = results / f"screen-{screen}" / f"confirm-{candidate}.json"
    if not path.is_file():  # a results/ without the screen (a fresh reproduce): the prose says so
        return NOT_CONFIRMED
    ev = read_json(path)
    row = summarize_evidence(ev, ev["last"])
    return f"{row[what]:.3f}%" if what == "mean_worst" else f"{row[what]:.2f}%"
