"""The pages: which generated section goes where in the README and docs/, each spliced between its markers, and
`tinymnist report`, which redraws every picture from results/ and regenerates every section. Nothing in pages/
types a number that a file holds: every one is read from results/."""

from __future__ import annotations

import re
from pathlib import Path

from ..lab.check import CHECK_FILE, RATE_FILE
from ..errors import TinyMnistError
from ..lab.series import STEPS
from ..fileio import atomic_path, read_json
from .common import RESULTS, markers, step_result
from .frontier import render_answer, render_frontier, render_headline, render_writeups, replot_frontier
from .performance import render_codemap, render_performance, render_performance_first, render_setup_time
from .searches import render_search_summary, render_searches
from .series_page import render, replot


def replot_checks(results: Path = RESULTS) -> list[Path]:
    """Draw every check evidence file under results/ (5-seed and pass-rate checks) beside it as a PNG."""
    from .plots import plot_proof

    drawn = []
    files = {*results.glob(CHECK_FILE.format(step="*")), *results.glob(RATE_FILE.format(step="*"))}
    for path in sorted(files):
        plot_proof(read_json(path), path.with_suffix(".png"))
        drawn.append(path.with_suffix(".png"))
    return drawn


SECTIONS = {"setup-time": render_setup_time, "codemap": render_codemap, "performance-first": render_performance_first, "search-summary": render_search_summary, "headline": render_headline, "answer": render_answer, "frontier": render_frontier, "experiments": render,
            "searches": render_searches, "performance": render_performance, "writeups": render_writeups}


# Where each generated section lives, relative to the checkout: the README is the front page, docs/ the evidence.
PAGES = {"README.md": ("setup-time", "headline", "answer", "frontier"), "docs/series.md": ("experiments",),
         "docs/searches.md": ("search-summary", "searches"), "docs/performance.md": ("performance-first", "performance"), "docs/usage.md": ("writeups", "codemap")}


def relink(text: str, page: str) -> str:
    """Sections link as from the checkout's root (results/..., docs/...); on a page under docs/, make every
    Markdown link and image target relative to that page."""
    if not page.startswith("docs/"):
        return text
    def fix(m: re.Match) -> str:
        target = m[1]
        if target.startswith(("http://", "https://", "#")):
            return m[0]
        return f"]({target[len('docs/'):] if target.startswith('docs/') else '../' + target})"

    return re.sub(r"\]\(([^)\s]+)\)", fix, text)


def page_section(page: str, section: str, results: Path = RESULTS) -> str:
    """A section as it must read on `page`."""
    return relink(SECTIONS[section](results), page)


def update_pages(root: Path = Path("."), results: Path = RESULTS) -> list[str]:
    """Regenerate every generated section of the README and the docs pages; return "page: section" for each that
    changed. A page without a section's markers is one TinyMnistError."""
    changed = []
    for page, sections in PAGES.items():
        path = Path(root) / page
        try:
            text = original = path.read_text()
        except OSError as e:
            raise TinyMnistError(f"{path}: cannot read ({e.strerror or e})") from None
        for name in sections:
            start, end = markers(name)
            if start not in text or end not in text:
                raise TinyMnistError(f"{path} has no {start} ... {end} markers: restore them where the section goes")
            head, rest = text.split(start, 1)
            old, tail = rest.split(end, 1)
            new = page_section(page, name, results)
            if start + old + end != new:
                changed.append(f"{page}: {name}")
            text = head + new + tail
        if text != original:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    return changed


def generated_section(page: Path, section: str) -> str:
    """The part of `page` between (and including) a section's markers."""
    start, end = markers(section)
    text = page.read_text()
    return start + text.split(start, 1)[1].split(end, 1)[0] + end


def regenerate(results: str | Path = RESULTS, root: str | Path = ".", log=print) -> list[str]:
    """`tinymnist report`: redraw every plot from results/ and regenerate the README's and docs/' sections."""
    results = Path(results)
    for s in STEPS:
        if step_result(s, results) is not None:
            replot(s, results)
    replot_checks(results)
    replot_frontier(results)
    return update_and_say(root, results, log)


def update_and_say(root, results, log=print) -> list[str]:
    changed = update_pages(Path(root), Path(results))
    log(f"regenerated {'; '.join(changed) if changed else 'nothing (every page already up to date)'}")
    return changed
