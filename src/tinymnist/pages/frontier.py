"""The README's headline, answer and frontier: the smallest step that passes 5 of 5, the smallest reliable one, and the
write-ups beside ours."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from ..lab.check import proof
from ..core.data import TRAIN_IMAGES
from ..lab.space import DEFAULT_VAL
from ..lab.series import STEPS, answer
from ..fileio import read_json
from ..models.summary import summarize
from ..target import LAST, pass_rate_bound, RELIABLE_PASSES, RELIABLE_SEEDS, SEEDS, budget_words
from .common import RESULTS, _anchor, _host, hardware_text, recipe_words, seconds_per_epoch
from .records import Records
from .render import section


def render_headline(results: Path = RESULTS) -> str:
    """The proven results, one row per step checked over seeds, and the two answers: the smallest step that passed
    its 5-seed check, and the smallest reliable one."""
    r = Records(results)
    five, reliable = r.smallest()
    tried = [c for c in r.checks() if c.wide is not None]
    return section("headline", "headline.md.j2", checks=r.checks(), five=five, reliable=reliable, tried=tried,
                   seeds=SEEDS, last=LAST, reliable_passes=RELIABLE_PASSES, reliable_seeds=RELIABLE_SEEDS)


def render_answer(results: Path = RESULTS) -> str:
    """The README's picture of the answer: its proof over seeds, one line and the plot."""
    step = answer()
    return section("answer", "answer.md.j2", step=step, anchor=_anchor(step.heading), a=Records(results).check(step),
                   reliable_passes=RELIABLE_PASSES, reliable_seeds=RELIABLE_SEEDS)


FRONTIER_PNG = "frontier.png"


def _frontier_rows(results: Path) -> list[dict]:
    """Every step with a committed test check, smallest first, with what the frontier shows of it."""

    rows = []
    r = Records(results)
    for s in STEPS:
        c = r.check(s)
        if c is None or c.metric != "test_acc":
            continue
        ev, pr, wide = r.json(c.file), c.proof, c.wide
        seconds = seconds_per_epoch([x["history"] for x in ev["seeds"]])
        objective = None
        if s.chosen_by:
            study, number = s.chosen_by
            trials = r.json(f"sweep-{study}/trials.json")["trials"]
            objective = next(t["objective"] for t in trials if t["trial"] == number)
        tried = sum(sum(r.json(f"sweep-{q}/trials.json")["counts"].values()) for q in s.searches)
        if s.screened_by:  # the 5-seed validation check's worst seed, and the screen's candidates
            screen, cand = s.screened_by
            objective = proof(r.json(f"screen-{screen}/confirm-{cand}.json")).worst
            tried += len(r.json(f"screen-{screen}/screen.json")["candidates"])
        rows.append({"name": s.name, "title": s.heading, "budget": s.budget, "params": c.params,
                     "macs": summarize(s.config.build_model()).macs, "seconds": seconds,
                     "threads": ev.get("threads_per_run"), "host": _host(ev), "objective": objective,
                     "worst": list(pr.seed_worsts), "passed": pr.passed, "tried": tried, "look": ev.get("test_look", 1),
                     "verdict": pr.verdict, "threshold": c.threshold, "last": pr.last,
                     "rate": c.rate_cell.replace("**", ""), "reliable": bool(wide and wide.reliable),
                     "rate_short": f"{pr.passes}/{pr.seeds}" + (f", {wide.passes}/{wide.seeds}" if wide else "")
                                   + f" (≥ {(wide or pr).rate_bound:.2f})"})
    return sorted(rows, key=lambda r: (r["params"], r["name"]))


def replot_frontier(results: Path = RESULTS) -> Optional[Path]:
    """Draw results/frontier.png from the committed checks (None if there are none)."""
    from .plots import plot_frontier

    rows = _frontier_rows(results)
    if not rows:
        return None
    plot_frontier(rows, rows[0]["threshold"], results / FRONTIER_PNG, validation=_validation_points(results))
    return results / FRONTIER_PNG


def _validation_points(results: Path) -> list[dict]:
    """The frontier's validation evidence: the yardstick's 5-seed validation check, and the screens' confirmed
    candidates (their own 5-seed validation checks), so a budget that has not earned a look at test has a point. Of
    the confirmations under one budget (a screen's max_params) the best by the gate's measure (the mean of the seeds'
    worsts) stands for them all, named with its budget and how many there were; the searches page lists every one."""

    def point(name: str, path: Path) -> dict:
        ev = read_json(path)
        return {"name": name, "params": ev["params"], "worst": list(proof(ev).seed_worsts), "passed": ev["passed"]}

    points = [point(f"{read_json(p)['step']} (validation)", p) for p in sorted(results.glob("valcheck-*.json"))]
    confirmed: dict[int, list[dict]] = {}
    for path in sorted(results.glob("screen-*/screen.json")):
        sc = read_json(path)
        for c in sc["confirmed"]:
            if (path.parent / f"confirm-{c['name']}.json").is_file():
                p = point(f"{sc['screen']}: {c['name']}", path.parent / f"confirm-{c['name']}.json")
                confirmed.setdefault(sc["max_params"], []).append(p)
    for budget, group in sorted(confirmed.items()):
        best = max(group, key=lambda p: statistics.mean(p["worst"]))
        tally = f"best of {len(group)} confirmed ≤ {budget:,}" if len(group) > 1 else f"confirmed ≤ {budget:,}"
        points.append({**best, "name": f"{best['name']}\n({tally})"})
    return points


def render_frontier(results: Path = RESULTS) -> str:
    """The frontier: parameters against the worst seed, as a plot and a table, with the smallest passing step."""
    rows = _frontier_rows(results)
    hosts = list(dict.fromkeys(r["host"] for r in rows))  # each measured host a letter, in order of size
    return section("frontier", "frontier.md.j2", rows=rows, hosts=hosts,
                   letter={h: chr(65 + i) for i, h in enumerate(hosts)}, png=FRONTIER_PNG, seeds=SEEDS,
                   val=DEFAULT_VAL, train_images=TRAIN_IMAGES, reliable_passes=RELIABLE_PASSES,
                   reliable_seeds=RELIABLE_SEEDS, five_of_five_bound=pass_rate_bound(SEEDS, SEEDS),
                   budget_words=budget_words, anchor=_anchor)


def render_writeups(results: Path = RESULTS) -> str:
    """Published networks rebuilt from their write-ups and checked over seeds: what the write-up claimed (quoted in
    results/writeups.json) beside our verdict and accuracy (the check evidence it names)."""
    from ..core.config import TrainConfig

    writeups = Records(results).writeups()
    first = next((w for w in writeups if w.check is not None), None)
    recipe = host = png = None
    if first is not None:
        recipe = recipe_words(TrainConfig.from_dict(first.check["config"]))
        host = hardware_text(first.check.get("env", {}))
        drawn = (results / writeups[0].evidence).with_suffix(".png")
        png = drawn.name if drawn.is_file() else None
    return section("writeups", "writeups.md.j2", writeups=writeups, first=first, recipe=recipe, host=host, png=png)
