"""A selection shaped like the rule: screen named candidates on validation, confirm the best over 5 validation seeds,
and say which of them earned a look at the test set.

A screen file (TOML) names a base step and its candidates, each the step's recipe with some fields changed (flat
recipe names as in a sweep space: `batch_size`, `aug.rotate`, `layout` ...):

    [screen]
    step = "budget-5000"     # the base recipe
    seeds = 2                # seeds per candidate in the screen
    max_params = 5000        # inclusive; a candidate over it is rejected before it trains
    confirm = 3              # the best this many go on to a validation check over `confirm_seeds` seeds
    yardstick = "valcheck-final.json"   # a passing step's validation check, under results/

    [[candidate]]
    name = "batch-64"
    batch_size = 64

Stage 1, the screen: every candidate trains `seeds` seeds holding out `val` training images (the test set is never
read) and is ranked by the mean over seeds and over the last epochs of validation accuracy, which one epoch's dip
moves less than it moves the worst (recorded beside it, with the spread between seeds). Stage 2, the confirmation:
the best `confirm` candidates are checked on validation over `confirm_seeds` seeds, the rule itself judged on the
held-out images; the screen's seeds are taken as they are (the same seed gives the same history), so only the new
seeds train. Stage 3 is the gate, no training: a candidate earns its one look at test when its validation check
stands at least as high as the yardstick's (a step that passes on test, checked on validation the same way), worst
seed and mean, or passes 99.40% outright; with `margin_spreads = k` the mean must beat the yardstick's by k times the
standard deviation of the yardstick's seeds' worsts, since a tie is no margin on new seeds. Every stage writes its
evidence under results/screen-<name>/ as it goes, so the same command resumes a stopped screen on any machine.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .check import check_recipe, mean_of_last, run_check, seed_gap, top_spread, worst_of_last
from ..errors import TinyMnistError
from ..fileio import read_json, read_toml, write_json
from .space import DEFAULT_VAL, check_field, nest_fields
from ..target import LAST, THRESHOLD

CONFIRM_SEEDS = 5
PENDING = "pending"  # a stage whose evidence is not there yet, when nothing may train
_SCREEN_KEYS = {"step", "seeds", "val", "max_params", "last", "confirm", "confirm_seeds", "yardstick", "margin_spreads",
                "fixed"}


@dataclass(frozen=True)
class Candidate:
    name: str
    changes: tuple  # (flat recipe name, value) pairs, in the file's order


@dataclass(frozen=True)
class Screen:
    name: str
    step: str
    candidates: tuple[Candidate, ...]
    max_params: int
    seeds: int = 2
    val: int = DEFAULT_VAL
    last: int = LAST
    confirm: int = 3
    confirm_seeds: int = CONFIRM_SEEDS
    yardstick: str = ""  # a validation check's evidence file, relative to results/
    margin_spreads: float = 0.0  # the gate's margin over the yardstick's mean, in standard deviations of its seeds' worsts
    fixed: tuple = ()  # (flat recipe name, value) pairs every candidate shares, before its own changes

    def recipe(self, candidate: Candidate):
        """The base step's recipe with the candidate's changes, holding out `val` images; validated."""
        from .series import get_step

        values = nest_fields({**dict(self.fixed), **dict(candidate.changes)})  # override() merges aug.* in
        return check_recipe(get_step(self.step), values.pop("model", None), values.pop("models_file", None) or None,
                            {**values, "val": self.val}).validate()


def read_screen(path: str | Path) -> Screen:
    """Parse a screen file; every mistake is one TinyMnistError naming the file and the key."""
    from .series import get_step

    path = Path(path)
    data = read_toml(path)
    head, cands = data.get("screen"), data.get("candidate")
    unknown = sorted(set(data) - {"screen", "candidate"})
    if unknown or not isinstance(head, dict) or not isinstance(cands, list) or not cands:
        raise TinyMnistError(f"{path}: a screen file has one [screen] table and [[candidate]] tables"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    bad = sorted(set(head) - _SCREEN_KEYS)
    if bad:
        raise TinyMnistError(f"{path} [screen]: unknown key(s) {', '.join(bad)} (valid: {', '.join(sorted(_SCREEN_KEYS))})")
    if "step" not in head or "max_params" not in head:
        raise TinyMnistError(f"{path} [screen]: needs step and max_params")
    get_step(head["step"])

    def changes_of(table: dict, where: str, own: bool) -> tuple:
        changes = []
        for key, value in table.items():
            if key == "name":
                continue
            flat = {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
            for k, v in flat.items():
                check_field(k, where)
                if own and k in ("val", "seed", "epochs"):
                    raise TinyMnistError(f"{where}: {k} is the screen's, not a candidate's")
                changes.append((k, tuple(v) if isinstance(v, list) else v))
        return tuple(changes)

    fixed = changes_of(head.get("fixed", {}), f"{path} [screen.fixed]", own=False)
    candidates, names = [], set()
    for i, c in enumerate(cands):
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in names:
            raise TinyMnistError(f"{path}: candidate {i + 1} needs a name of its own (no '/')")
        names.add(name)
        candidates.append(Candidate(name, changes_of(c, f"{path} candidate {name!r}", own=True)))
    screen = Screen(path.stem, head["step"], tuple(candidates), int(head["max_params"]), int(head.get("seeds", 2)),
                    int(head.get("val", DEFAULT_VAL)), int(head.get("last", LAST)), int(head.get("confirm", 3)),
                    int(head.get("confirm_seeds", CONFIRM_SEEDS)), str(head.get("yardstick", "")),
                    _number(head.get("margin_spreads", 0.0), f"{path} [screen] margin_spreads"), fixed)
    if screen.val <= 0 or screen.seeds < 1 or screen.confirm < 0 or screen.confirm_seeds < 1 or screen.margin_spreads < 0:
        raise TinyMnistError(f"{path} [screen]: val, seeds and confirm_seeds must be positive, confirm and "
                             "margin_spreads >= 0")
    for c in screen.candidates:
        screen.recipe(c)  # every candidate is a recipe that trains, before anything does
    return screen


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TinyMnistError(f"{where}: a number, not {value!r}")
    return float(value)


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def summarize_evidence(ev: dict, last: int) -> dict:
    """One check's validation evidence as a row: the mean (the screen's objective), the worst, and the spreads."""
    histories = [s["history"] for s in ev["seeds"]]
    means = [mean_of_last(h, last, ev["metric"]) for h in histories]
    worsts = [worst_of_last(h, last, ev["metric"]) for h in histories]
    return {"objective": round(statistics.mean(means), 4), "worst": min(worsts), "mean_worst": round(
            statistics.mean(worsts), 4), "seed_means": [round(m, 4) for m in means], "seed_worsts": worsts,
            "seed_spread": round(statistics.stdev(worsts), 4) if len(worsts) > 1 else 0.0,
            "params": ev["params"], "passed": ev["passed"]}


def earns_test_look(confirmed: dict, yardstick: Optional[dict], margin_spreads: float = 0.0) -> tuple[bool, str]:
    """The gate: a validation check at least as high as the yardstick's worst seed, and whose mean of the seeds'
    worsts beats the yardstick's by `margin_spreads` times the standard deviation of the yardstick's seeds' worsts
    (0: a tie is enough); or one that passes the rule outright on validation."""
    if confirmed["worst"] >= THRESHOLD:
        return True, f"passes on validation (worst seed {confirmed['worst']:.2f}% >= {THRESHOLD:.2f}%)"
    if yardstick is None:
        return False, f"worst seed {confirmed['worst']:.2f}% < {THRESHOLD:.2f}%, and no yardstick to compare with"
    bar = round(yardstick["mean_worst"] + margin_spreads * yardstick["seed_spread"], 4)  # as mean_worst is rounded
    ok = confirmed["worst"] >= yardstick["worst"] and confirmed["mean_worst"] >= bar
    margin = (f" + {margin_spreads:g} x its seeds' std {yardstick['seed_spread']:.3f} = {bar:.3f}%"
              if margin_spreads else "")
    return ok, (f"worst seed {confirmed['worst']:.2f}% and mean {confirmed['mean_worst']:.3f}% against the "
                f"yardstick's {yardstick['worst']:.2f}% and {yardstick['mean_worst']:.3f}%{margin}")


def run_screen(path: str | Path, results: str | Path = "results", jobs: int = 0, threads: int = 0,
               data_dir: Optional[str] = None, device: str = "auto", runs: str = "runs",
               progress: Optional[bool] = None, log=print, train: bool = True) -> dict:
    """Run (or resume) the screen, the confirmation and the gate; return the summary written to screen.json. With
    train=False nothing trains: screen.json is written from the evidence already there (a stage not yet run is
    pending), to commit a running screen's progress."""
    from ..core.config import TrainConfig
    from ..core.plan import checked_model
    from ..models.model import count_params

    screen = read_screen(path)
    out = Path(results) / f"screen-{screen.name}"
    yard_path = Path(results) / screen.yardstick if screen.yardstick else None
    yard = None
    if yard_path is not None and yard_path.is_file():
        yard = summarize_evidence(read_json(yard_path), screen.last)
    elif yard_path is not None:  # the screen and the confirmations can run; the gate waits for it
        log(f"no yardstick yet at {yard_path} (a step's 5-seed validation check: tinymnist check STEP --val "
            f"{screen.val} --json FILE): only a candidate that passes on validation earns a look at test")

    def stage(kind: str, cand: Candidate, seeds: int):
        """The stage's evidence (run now if need be), None for a candidate over the budget, or PENDING."""
        cfg = screen.recipe(cand)
        file = out / f"{kind}-{cand.name}.json"
        if file.is_file():
            ev = read_json(file)
            if TrainConfig.from_dict(ev["config"]).recipe() == cfg.recipe() and len(ev["seeds"]) == seeds:
                return ev  # done before: the screen resumes
            raise TinyMnistError(f"{file} holds another recipe than candidate {cand.name!r} has now: give the "
                                 "changed candidate a new name")
        params = count_params(checked_model(cfg))
        if params > screen.max_params:
            log(f"{cand.name}: {params:,} parameters > max_params {screen.max_params:,}: rejected, not trained")
            return None
        if not train:
            return PENDING
        log(f"{kind} {cand.name} ({params:,} parameters; {', '.join(f'{k}={v}' for k, v in cand.changes) or 'as the step'})")
        earlier = out / f"screen-{cand.name}.json"  # the confirmation takes the screen's seeds as they are
        reuse = read_json(earlier) if kind == "confirm" and earlier.is_file() else None
        ev = run_check(screen.step, seeds, screen.last, data_dir=data_dir, device=device, out_root=runs,
                       progress=progress, threads=threads, jobs=jobs, recipe=cfg, max_params=screen.max_params,
                       results_dir=results, reuse=reuse)
        if "reused" in ev:
            ev["reused"]["file"] = earlier.name
        ev["candidate"] = {"screen": screen.name, "name": cand.name, "changes": dict(cand.changes)}
        write_json(file, ev)
        return ev

    def save(rows: list, confirmed: list, done: bool) -> dict:
        """screen.json as far as the screen got: written after every candidate, so a stopped screen's progress is
        evidence (committed as it grows), and the same command resumes it."""
        ranked = sorted((r for r in rows if "objective" in r), key=lambda r: -r["objective"])
        summary = {"screen": screen.name, "step": screen.step, "max_params": screen.max_params, "seeds": screen.seeds,
                   "val": screen.val, "last": screen.last, "margin_spreads": screen.margin_spreads,
                   "fixed": dict(screen.fixed), "objective": "mean over seeds of the mean validation "
                   "accuracy of the last epochs", "yardstick": {"file": screen.yardstick, **yard} if yard else None,
                   "done": done, "candidates": rows, "ranked": [r["name"] for r in ranked],
                   "seed_gap": _rounded(seed_gap([r["seed_worsts"] for r in ranked])),
                   "top_range": _rounded(top_spread([r["objective"] for r in ranked], 3)), "confirmed": confirmed}
        write_json(out / "screen.json", summary)
        return summary

    rows: list = []
    for cand in screen.candidates:
        ev = stage("screen", cand, screen.seeds)
        rows.append({"name": cand.name, "changes": dict(cand.changes),
                     **({"pending": True} if ev is PENDING else summarize_evidence(ev, screen.last) if ev
                        else {"rejected": True})})
        save(rows, [], done=False)
    ranked = sorted((r for r in rows if "objective" in r), key=lambda r: -r["objective"])
    confirmed: list = []
    if not any(r.get("pending") for r in rows):  # the best are known only once every candidate is in
        for r in ranked[:screen.confirm]:
            cand = next(c for c in screen.candidates if c.name == r["name"])
            ev = stage("confirm", cand, screen.confirm_seeds)
            if ev is PENDING:
                break
            row = {"name": cand.name, **summarize_evidence(ev, screen.last)}
            row["earns_test_look"], row["why"] = earns_test_look(row, yard, screen.margin_spreads)
            confirmed.append(row)
            save(rows, confirmed, done=False)
    finished = len(confirmed) == min(screen.confirm, len(ranked)) and not any(r.get("pending") for r in rows)
    summary = save(rows, confirmed, done=finished)
    log(format_screen(summary))
    return summary


def format_screen(summary: dict) -> str:
    """The screen as text: candidates best first, then the confirmations and the gate."""
    lines = [f"screen {summary['screen']} (step {summary['step']}, at most {summary['max_params']:,} parameters, "
             f"{summary['seeds']} seeds, {summary['val']:,} held-out images): by {summary['objective']}"]
    by_name = {r["name"]: r for r in summary["candidates"]}
    for name in summary["ranked"]:
        r = by_name[name]
        lines.append(f"  {r['objective']:.3f}%  worst {r['worst']:.2f}%  seed gap {seed_gap([r['seed_worsts']]) or 0:.3f}  "
                     f"{r['params']:>6,} params  {name}")
    for r in summary["candidates"]:
        if r.get("rejected"):
            lines.append(f"  rejected (over the budget)  {r['name']}")
        elif r.get("pending"):
            lines.append(f"  not screened yet  {r['name']}")
    if summary["seed_gap"] is not None and summary["top_range"] is not None:
        lines.append(f"the seeds' own spread (the mean gap between a candidate's best and worst seed): "
                     f"{summary['seed_gap']:.3f}; the top 3 lie within {summary['top_range']:.3f}")
    for c in summary["confirmed"]:
        lines.append(f"confirmed {c['name']} over {len(c['seed_worsts'])} seeds: worst {c['worst']:.2f}%, mean of "
                     f"the worsts {c['mean_worst']:.2f}%: {'earns a look at test' if c['earns_test_look'] else 'no look at test'} "
                     f"({c['why']})")
    return "\n".join(lines)
