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


def _evidence(ev: dict, held: int = 0, mean: bool = True) -> dict:
    """A check's row of the selection table: its images held out (0: judged on test), seeds and worst seed, and the
    mean of the seeds' worsts (None: not shown)."""
    pr = proof(ev)
    return {"held": held, "seeds": len(pr.seed_worsts), "worst": pr.worst,
            "mean_worst": statistics.mean(pr.seed_worsts) if mean else None}


def _selection_lines(step: Step, ev: dict, results: Path) -> list[str]:
    """The validation result that chose a searched step's recipe (a screen's 5-seed confirmation beside the
    yardstick's, or a sweep's trial and its rank), beside the test check that confirmed it."""
    if step.screened_by is not None:
        screen, cand = step.screened_by
        path = results / f"screen-{screen}" / f"confirm-{cand}.json"
        if not path.is_file():
            raise TinyMnistError(f"step {step.name!r} was earned by candidate {cand!r} of screen {screen!r}, but "
                                 f"{path} is missing")
        val = read_json(path)
        evidence = [(f"validation: candidate `{cand}` of screen `{screen}`, confirmed",
                     _evidence(val, held=val["config"]["val"]))]  # each check's own held-out size
        yard = results / YARDSTICK
        if yard.is_file():
            y = read_json(yard)
            evidence.append((f"validation bar: `{y['step']}` (`results/{YARDSTICK}`)",
                             _evidence(y, held=y["config"]["val"])))
        evidence.append(("test: this check", _evidence(ev)))
        how = "Earned"
    elif step.chosen_by is not None:
        study, number = step.chosen_by
        path = results / f"sweep-{study}" / "trials.json"
        if not path.is_file():
            raise TinyMnistError(f"step {step.name!r} was chosen by study {study!r}, but {path} is missing")
        row = next((r for r in read_json(path)["trials"] if r["trial"] == number), None)
        if row is None:
            raise TinyMnistError(f"{path} has no complete trial {number}, which chose step {step.name!r}")
        searches = step.searches or (study,)  # the searches behind this step, all judged on the same budget
        every = [r["objective"] for q in searches for r in read_json(results / f"sweep-{q}" / "trials.json")["trials"]]
        rank = 1 + sum(v > row["objective"] for v in every)
        among = (f"the {len(every)} complete trials of `{study}`" if searches == (study,) else
                 f"the {len(every)} complete trials of its searches: " + ", ".join(f"`{q}`" for q in searches))
        evidence = [(f"validation: trial {number} of `{study}` (rank {rank} of {among})",
                     {"held": _space_fixed(results, study).get("val", 0), "seeds": len(row["val_worst"]),
                      "worst": row["objective"], "mean_worst": None}),
                    ("test: this check", _evidence(ev, mean=False))]
        how = "Chosen"
    else:
        return []
    return render_template("selection.md.j2", how=how, evidence=evidence, k=ev["last"], train_images=TRAIN_IMAGES,
                           test_images=TEST_IMAGES).rstrip("\n").split("\n")


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
    # the checkpoint as a reader can name it: runs/ is not committed, so a run's path becomes its placeholder; so
    # does the shipped model's path once another step is the answer (the package now ships that step's run)
    parts = Path(e["checkpoint"]).parts
    shipped = parts[:3] == ("src", "tinymnist", "assets")
    by_name = parts[:1] == ("runs",) or (shipped and step.name != answer().name)
    text = render_template(
        "errors.md.j2", step=step.name, e=e, run=run, host=hardware_text(run.get("env", {})) if run else None,
        shown="runs/<run>/model.pt" if by_name else e["checkpoint"],
        common=sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:3],
        rel=f"results/{step.name}/errors",  # as the README links it, wherever results/ was read from
        where=where.relative_to(results).as_posix() if where else None, errors_file=ERRORS_FILE,
        grid_file=GRID_FILE, confusion_file=CONFUSION_FILE)
    return text.split("\n")


def _step_record(step: Step, result, results: Path) -> dict:
    """What series.md.j2 shows of one step: its names, its network's size and summary, its prose with the numbers
    filled in, its run's result (None: not run) and its checks' lines."""
    model = step.config.build_model()
    summ = summarize(model)
    return {"name": step.name, "heading": step.heading, "anchor": _anchor(step.heading), "model": step.config.model,
            "params": model.num_params(), "macs": summ.macs, "rf": summ.rf, "result": result,
            "seconds_per_epoch": seconds_per_epoch([result["history"]]) if result else None,
            "target": fill(step.target, step, results),
            "recipe": recipe_words(step.config, model.dropout, model.activation),
            "summary": format_summary(summ, title=step.config.model),
            "analysis": fill(step.analysis, step, results) if step.analysis else "",
            "checks": _check_section(step, results)}  # the proof over seeds, beside its step


def render(results: Path = RESULTS) -> str:
    """The whole generated experiments section, as Markdown (pages/templates/series.md.j2)."""
    steps = [_step_record(s, step_result(s, results), results) for s in STEPS]
    screens = [sc for sc in Records(results).screens() if not sc.earned]  # negative results, on this page too
    negative = render_template("negative_screens.md.j2", screens=screens, last=LAST).strip("\n")
    # each line of the section ends in a line break, so the end marker follows the last directly
    body = render_template("series.md.j2", steps=steps, last=LAST, negative=negative)
    return "\n".join([START, NOTE, ""]) + "\n" + body + END


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
