"""docs/searches.md: every screen and sweep, and the README's summary of the searches."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..lab.check import CHECK_FILE, proof, seed_gap, top_spread, worst_of_last
from ..core.data import TRAIN_IMAGES
from ..lab.series import STEPS
from ..fileio import read_json
from ..target import LAST, MAX_PARAMS, THRESHOLD, budget_words
from .records import Records
from .render import render_template
from .common import NOTE, RESULTS, _short, markers


def _space(results: Path, study: str) -> dict:
    """A committed study's space file, spaces/<study>.toml beside results/."""
    from ..lab.space import read_space

    return read_space(results.parent / "spaces" / f"{study}.toml")


def _space_fixed(results: Path, study: str) -> dict:
    return _space(results, study).get("fixed", {})


def render_searches(results: Path = RESULTS) -> str:
    """The searches page's generated section: every committed sweep, and the validation bars."""
    start, end = markers("searches")
    body = _search_sections(results) or ["No search has been committed yet.", ""]
    return "\n".join([start, NOTE, "", *body, end])


def _search_sections(results: Path) -> list[str]:
    """Every committed sweep (results/sweep-*/trials.json): how many recipes were tried and the best on validation."""
    out, studies = [], {}
    found = [(read_json(path), path) for path in results.glob("sweep-*/trials.json")]
    for t, path in sorted(found, key=lambda tp: (tp[0].get("started") or "", tp[1].name)):  # in the order they ran
        studies[t["study"]] = sum(t["counts"].values())
        out += _search_section(t, path, results)
    if len(studies) > 1:
        out += [f"In all, {len(studies)} searches tried **{sum(studies.values())} recipes** on validation.", ""]
    out += _screen_sections(results)
    return out + (_validation_bars(results) if out else [])


def _screen_sections(results: Path) -> list[str]:
    """Every committed screen (results/screen-*/screen.json): its candidates on 2 seeds, its confirmations over 5,
    and the gate, which decides whether a candidate earned a look at test."""
    r = Records(results)
    screens = [r.json(f"{p.parent.name}/screen.json") for p in sorted(results.glob("screen-*/screen.json"))]
    if not screens:
        return []
    text = render_template("screens.md.j2", screens=screens, short=_short, g=lambda v: f"{v:g}")
    return text.rstrip("\n").split("\n") + [""]


def _search_section(t: dict, path: Path, results: Path) -> list[str]:
    """One sweep: its counts, its objective as the trials record it, its best trials, the one a step refits."""
    c, space = t["counts"], _space(results, t["study"])
    k = space.get("last", LAST)
    seeds = max((len(r.get("val_worst") or []) for r in t["trials"]), default=0)
    over = f", the minimum over its {seeds} seeds" if seeds > 1 else ""
    test = ("trials made before validation runs stopped reading the test set also recorded test accuracy, which "
            "was not read to choose" if any(r.get("test_worst") for r in t["trials"])
            else "its runs never read the test set")
    chosen = {s.chosen_by[1]: s.name for s in STEPS if s.chosen_by and s.chosen_by[0] == t["study"]}
    d = Path("results") / path.parent.name  # as the README links it, wherever results/ was read from
    fixed = ", ".join(f"{name}={_short(v)}" for name, v in _space_fixed(results, t["study"]).items())
    out = [f"### Search: `{t['study']}`", "",
           f"The study `{t['study']}` (`tinymnist sweep` of `spaces/{t['study']}.toml`) tried **{sum(c.values())} recipes**: {c.get('complete', 0)} "
           f"complete, {c.get('pruned', 0)} pruned by the median rule or rejected over the parameter budget "
           f"({t['rejected_over_budget']} rejected), {c.get('fail', 0)} failed (stopped mid-trial)"
           + (f", {c['running']} running when the study was last exported" if c.get("running") else "")
           + ". Each was judged "
           f"on the held-out validation images only: the objective is the worst validation accuracy of its last {k} "
           f"epochs{over}. The study is committed as `{d.as_posix()}/study.db` with every trial in "
           f"`{d.as_posix()}/trials.json`; {test}. Every trial trains the `{space.get('step')}` step's recipe with "
           f"{fixed} fixed, and the fields in the table searched."
           + (f" A trial marked with a step is the one that step refits on all {TRAIN_IMAGES:,} images." if chosen else ""),
           "",
           f"| trial | layout and recipe | parameters | MACs | validation: worst of last {k} | per seed |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in t["trials"][:8]:
        values = ", ".join(f"{name}={_short(v)}" for name, v in row["values"].items())
        mark = f" → `{chosen[row['trial']]}`" if row["trial"] in chosen else ""
        per_seed = ", ".join(f"{v:.2f}" for v in row.get("val_worst") or [])
        out.append(f"| {row['trial']}{mark} | {values} | {row['params']:,} | {row['macs']:,} | "
                   f"{row['objective']:.2f}% | {per_seed} |")
    for name in ("history", "importances"):
        png = d / f"{t['study']}-{name}.png"
        if name == "importances" and c.get("complete", 0) < MIN_TRIALS_FOR_IMPORTANCES:
            out += ["", f"(Parameter importances are not shown: {c.get('complete', 0)} complete trials are too few "
                        f"to rank parameters; below {MIN_TRIALS_FOR_IMPORTANCES} they are noise.)"]
        elif (path.parent / png.name).is_file():
            out += ["", f"![{t['study']} {name}]({png.as_posix()})"]
    return out + [""]


MIN_TRIALS_FOR_IMPORTANCES = 10  # fANOVA over fewer complete trials ranks parameters by noise


YARDSTICK = "valcheck-final.json"  # the 5-seed validation check of a step that passes on test: the validation bar


def _study_rows(results: Path) -> list[dict]:
    """Each committed sweep and screen as one row of the searches' summary, in the order they ran."""
    rows = []
    found = [(read_json(path), path) for path in results.glob("sweep-*/trials.json")]
    for t, path in sorted(found, key=lambda tp: (tp[0].get("started") or "", tp[1].name)):
        space, trials = _space(results, t["study"]), t["trials"]
        objectives = [r["objective"] for r in trials]
        pairs = [r["val_worst"] for r in trials if len(r.get("val_worst") or []) > 1]
        fed = [s.name for s in STEPS if t["study"] in (s.searches or ()) or (s.chosen_by or ("",))[0] == t["study"]]
        rows.append({"name": t["study"], "kind": "sweep", "link": f"#search-{t['study']}",
                     "budget": int(space.get("max_params", MAX_PARAMS)),
                     "seeds": max((len(r.get("val_worst") or []) for r in trials), default=1),
                     "complete": len(trials), "total": sum(t["counts"].values()),
                     "best": max(objectives) if objectives else None, "objective": "worst",
                     "spread": seed_gap(pairs), "top": top_spread(objectives, 6),
                     "fed": fed})
    for path in sorted(results.glob("screen-*/screen.json")):
        sc = read_json(path)
        ranked = [r for r in sc["candidates"] if "objective" in r]
        rows.append({"name": sc["screen"], "kind": "screen", "link": "#screens", "budget": sc["max_params"],
                     "seeds": sc["seeds"], "complete": len(ranked), "total": len(sc["candidates"]),
                     "best": max((r["objective"] for r in ranked), default=None), "objective": "mean",
                     "spread": seed_gap([r["seed_worsts"] for r in ranked]),
                     "top": top_spread([r["objective"] for r in ranked], 6),
                     "fed": [f"{c['name']} (earned a test look)" if c["earns_test_look"] else f"{c['name']} (no test look)"
                             for c in sc["confirmed"]]})
    return rows


def render_search_summary(results: Path = RESULTS) -> str:
    """The searches page's first table: every search in one row, with the seeds' own spread beside the spread of its
    best trials, and the validation bar a candidate has to clear."""
    start, end = markers("search-summary")
    rows = _study_rows(results)
    out = [start, NOTE, ""]
    yard = results / YARDSTICK
    if yard.is_file():
        ev = read_json(yard)
        pr = proof(ev)
        test = results / CHECK_FILE.format(step=ev["step"])
        on_test = f", which passes on test (worst seed {proof(read_json(test)).worst:.2f}%)" if test.is_file() else ""
        out += [f"**The validation bar.** `{ev['step']}`{on_test}, checked over {len(pr.seed_worsts)} seeds on the "
                f"{ev['config']['val']:,} held-out images (`results/{YARDSTICK}`): worst seed **{pr.worst:.2f}%**, "
                f"mean of the seeds' worsts **{statistics.mean(pr.seed_worsts):.2f}%**. Validation reads lower than "
                "test for the same recipe, so a candidate earns its one look at test when its own 5-seed validation "
                f"check stands at least this high, worst seed and mean, or passes {THRESHOLD:.2f}% outright; a screen may ask for a margin "
                "above the mean (`margin_spreads`, in multiples of the standard deviation of the bar's seeds' worsts), and its section says so.", ""]
    if not rows:
        return "\n".join(out + ["No search has been committed yet.", "", end])
    out += ["| search | budget | seeds per trial | complete of all | best score | seeds' own spread | spread of the "
            "top 6 | fed |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        best = f"{r['best']:.2f}% ({r['objective']})" if r["best"] is not None else "—"
        spread = f"{r['spread']:.3f}" if r["spread"] is not None else "— (1 seed)"
        top = f"{r['top']:.3f}" if r["top"] is not None else "—"
        out.append(f"| [{r['name']}]({r['link']}) ({r['kind']}) | {budget_words(r['budget'])} | {r['seeds']} | "
                   f"{r['complete']} of {r['total']} | {best} | {spread} | {top} | {', '.join(r['fed']) or '—'} |")
    out += ["", f"A score is validation accuracy over the last {LAST} epochs: *worst* is the rule's (the lowest epoch, the "
            "lowest seed), *mean* the screens' (over epochs and seeds). The seeds' own spread is the mean gap between "
            "a trial's best and worst seed; where the best trials lie closer together than that, their order is "
            "seed noise, not a ranking.", "", end]
    return "\n".join(out)


def _validation_bars(results: Path) -> list[str]:
    """Proven recipes trained once with a validation split (results/val-reference-<step>/): how a recipe that passes
    on test scores on validation, which is the bar a searched recipe has to clear there."""
    out = []
    for d in sorted(results.glob("val-reference-*/")):
        meta, history = read_json(d / "config.json"), read_json(d / "history.json")
        val = worst_of_last(history, LAST, "val_acc")
        # runs from before validation runs stopped reading the test set recorded it too
        test = (f" and {worst_of_last(history, LAST):.2f}% on test in the same run (a run from before validation runs "
                "stopped reading the test set)") if "test_acc" in history[-1] else ""
        out += [f"**Validation bar.** The `{meta['name']}` recipe ({meta['params']:,} parameters), which passes on "
                f"test, trained once with the same {meta['config']['val']:,} images held out (seed {meta['seed']}, "
                f"`results/{d.name}/`): worst of its last {LAST} epochs **{val:.2f}%** on validation{test}. A smaller "
                "recipe needs about that on validation to have a chance on test.", ""]
    return out
