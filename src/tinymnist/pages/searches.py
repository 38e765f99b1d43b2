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
    """One sweep: its counts, its objective as the trials record it, its best trials, the one a step refits
    (pages/templates/sweep.md.j2)."""
    c, space = t["counts"], _space(results, t["study"])
    d = Path("results") / path.parent.name  # as the README links it, wherever results/ was read from
    plots = []
    for name in ("history", "importances"):
        png = d / f"{t['study']}-{name}.png"
        if name == "importances" and c.get("complete", 0) < MIN_TRIALS_FOR_IMPORTANCES:
            plots.append((name, None))
        elif (path.parent / png.name).is_file():
            plots.append((name, png.as_posix()))
    text = render_template(
        "sweep.md.j2", t=t, k=space.get("last", LAST), d=d.as_posix(), step=space.get("step"),
        seeds=max((len(r.get("val_worst") or []) for r in t["trials"]), default=0),
        read_test=any(r.get("test_worst") for r in t["trials"]),
        chosen={s.chosen_by[1]: s.name for s in STEPS if s.chosen_by and s.chosen_by[0] == t["study"]},
        fixed=_assignments(_space_fixed(results, t["study"])),
        values=lambda row: _assignments(row["values"]), plots=plots, min_trials=MIN_TRIALS_FOR_IMPORTANCES,
        train_images=TRAIN_IMAGES)
    return text.split("\n")


def _assignments(values: dict) -> str:
    """name=value, ... as the pages write a recipe's fields."""
    return ", ".join(f"{name}={_short(v)}" for name, v in values.items())


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
    best trials, and the validation bar a candidate has to clear (pages/templates/search_summary.md.j2)."""
    start, end = markers("search-summary")
    bar, yard = None, results / YARDSTICK
    if yard.is_file():
        ev = read_json(yard)
        pr = proof(ev)
        test = results / CHECK_FILE.format(step=ev["step"])
        bar = {"step": ev["step"], "file": YARDSTICK, "seeds": len(pr.seed_worsts), "held": ev["config"]["val"],
               "worst": pr.worst, "mean_worst": statistics.mean(pr.seed_worsts),
               "test_worst": proof(read_json(test)).worst if test.is_file() else None}
    text = render_template("search_summary.md.j2", bar=bar, rows=_study_rows(results), last=LAST,
                           threshold=THRESHOLD, budget_words=budget_words)
    return "\n".join([start, NOTE, ""]) + "\n" + text + end


def _validation_bars(results: Path) -> list[str]:
    """Proven recipes trained once with a validation split (results/val-reference-<step>/): how a recipe that passes
    on test scores on validation, which is the bar a searched recipe has to clear there."""
    bars = []
    for d in sorted(results.glob("val-reference-*/")):
        meta, history = read_json(d / "config.json"), read_json(d / "history.json")
        bars.append({"meta": meta, "dir": d.name, "val": worst_of_last(history, LAST, "val_acc"),
                     # runs from before validation runs stopped reading the test set recorded it too
                     "test": worst_of_last(history, LAST) if "test_acc" in history[-1] else None})
    text = render_template("validation_bars.md.j2", bars=bars, last=LAST)
    return text.split("\n")[:-1] if text else []
