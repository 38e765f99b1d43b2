"""docs/performance.md and the README's speed lines: the benchmark, the first command's time, the timed checks, and the
code map."""

from __future__ import annotations

from pathlib import Path

from .common import NOTE, RESULTS, _kernels_text, _wait, hardware_text, markers
from .records import Records
from .render import render_template, section


BENCH_FILE = "bench.json"


def render_performance(results: Path = RESULTS) -> str:
    """The performance section, from results/bench.json (and the small-batch bench and the timed checks, when
    committed)."""
    start, end = markers("performance")
    b = Records(results).json(BENCH_FILE)
    text = render_template("performance.md.j2", b=b, file=BENCH_FILE, host=hardware_text(b["env"]) if b else None,
                           g=lambda v: f"{v:g}", kernels_text=_kernels_text, wait=_wait)
    lines = text.rstrip("\n").split("\n")
    if b is not None:
        lines += _small_batch_lines(results) + _layer_lines(results) + _version_lines(results) + _timed_checks(results)
    return "\n".join([start, NOTE, "", *lines, "", end])


def render_setup_time(results: Path = RESULTS) -> str:
    """How long the README's first command took from a fresh clone, install included, and where."""
    return section("setup-time", "setup_time.md.j2", fc=Records(results).first_command())


def render_codemap(results: Path = RESULTS) -> str:
    """The map of the code: every layer of the package, lowest first, with every module in it and the first sentence
    of its own docstring, so that the map changes when the code does."""
    import ast

    from ..layers import LAYERS, layer_of

    def first_sentence(path: Path) -> str:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        text = " ".join(doc.split())
        return (text.split(". ")[0].rstrip(".") + "." if text else "(no docstring)").replace("|", "/")

    root = Path(__file__).resolve().parents[1]
    layers = []
    for layer, role in LAYERS:
        where = root / layer
        modules = (sorted(p for p in where.glob("*.py") if p.name != "__init__.py") if where.is_dir() else
                   sorted(p for p in root.glob("*.py") if layer_of(p.stem) == layer))
        layers.append({"name": layer, "package": where.is_dir(),
                       "about": first_sentence(where / "__init__.py") if where.is_dir() else role,
                       "modules": [{"path": p.relative_to(root).as_posix(), "about": first_sentence(p)}
                                   for p in modules]})
    return section("codemap", "codemap.md.j2", layers=layers)


def render_performance_first(results: Path = RESULTS) -> str:
    """What a user needs before the evidence: how long a run and a check take, what --jobs gains, and the one setting
    to leave alone; every number from the timed checks and results/bench.json."""
    r = Records(results)
    by_jobs = {t.jobs: t for t in r.timed_checks()}  # the last file of each job count, as the table reads them
    first = by_jobs[min(by_jobs)] if by_jobs else None
    most = by_jobs[max(by_jobs)] if len(by_jobs) > 1 else None
    b, spinning = r.json(BENCH_FILE), None
    if b is not None and "single_run_spinning" in b:
        spinning = {"ratio": b["single_run_spinning"]["images_per_s"] / b["single_run"]["images_per_s"],
                    "file": BENCH_FILE, "host": hardware_text(b["env"])}
    return section("performance-first", "performance_first.md.j2", first=first, most=most, spinning=spinning)


def _small_batch_lines(results: Path) -> list[str]:
    """The model step at small batches, before and after the kernels kept their own threads, from one bench run."""
    sb = Records(results).small_batches()
    return [] if sb is None else render_template("small_batches.md.j2", sb=sb).split("\n")


def _layer_lines(results: Path) -> list[str]:
    """Where a step of the answer goes, layer by layer, from one bench --layers run."""
    lt = Records(results).layer_times()
    return [] if lt is None else render_template("layers.md.j2", lt=lt).split("\n")


def _version_lines(results: Path) -> list[str]:
    """Before/after measurements of the code, versions taking turns on one host (scripts/ab_steps.py)."""
    versions = Records(results).versions()
    return [] if not versions else ["", *render_template("versions.md.j2", versions=versions).rstrip("\n").split("\n")]


def _timed_checks(results: Path) -> list[str]:
    """The wall time of the same check with one job and with one per core, when both were committed."""
    timed = Records(results).timed_checks()
    if not timed:
        return []
    by_jobs = {t.jobs: t for t in timed}
    one, most = (by_jobs.get(1), by_jobs[max(by_jobs)]) if len(by_jobs) > 1 else (None, None)
    return render_template("timed_checks.md.j2", timed=timed, one=one, most=most).rstrip("\n").split("\n")
