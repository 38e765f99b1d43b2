"""The pages' prose as Jinja2 templates (pages/templates/) over typed records (records.py): one environment, one
table helper, and the section frame every generated section shares.

A template writes a paragraph over as many lines as reads well; `{% filter paragraph %}` joins it into the one line
Markdown gets. Block tags eat the line break after them (trim_blocks), so a blank line after `{% endfilter %}` is
written as two. Any name a template uses that its records lack is an error (StrictUndefined), never an empty string.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import jinja2

from ..lab.check import proof
from ..target import RELIABLE_PASSES, RELIABLE_SEEDS
from .common import NOTE, hardware_text, markers

TEMPLATES = Path(__file__).with_name("templates")


def paragraph(text: str) -> str:
    """A template's paragraph as one line: every run of whitespace (line breaks included) becomes one space."""
    return re.sub(r"\s+", " ", text).strip()


def table(header: Sequence[str], align: str, rows: Iterable[Sequence[object]], tight: bool = False) -> str:
    """A Markdown table: `align` has one letter per column, l (left) or r (right); `tight` writes an empty cell
    with one space instead of two (as the code map always has)."""
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns, {len(align)} alignments")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    empty = " " if tight else "  "  # an empty cell: "| |" (tight) or "|  |"
    lines += ["|" + "|".join(f" {c} " if str(c) else empty for c in row) + "|" for row in rows]
    return "\n".join(lines)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters["paragraph"] = paragraph
    env.filters["count"] = lambda n: f"{n:,.0f}"  # 7628 -> 7,628
    env.filters["fmt2"] = lambda x: f"{x:.2f}"  # an accuracy as the pages print it
    env.globals["table"] = table
    return env


_ENV = _environment()


def render_template(name: str, **records) -> str:
    """A template's text over the given records."""
    return _ENV.get_template(name).render(**records)


def section(name: str, template: str, **records) -> str:
    """A generated section: its markers, the note that it is generated, and the template's text."""
    start, end = markers(name)
    return "\n".join([start, NOTE, "", render_template(template, **records).strip("\n"), "", end])


def proof_lines(ev: dict, plot: Optional[str], alt: str, extra: Sequence[str] = ()) -> list[str]:
    """The body of a proof over seeds, as the series' pages and a student's report card both show it: each seed's
    last accuracies, the final mean ± std, each rule with its verdict, `extra` lines, the hardware, the plot
    (pages/templates/proof.md.j2)."""
    pr, env = proof(ev), ev.get("env", {})
    text = render_template("proof.md.j2", ev=ev, pr=pr, k=pr.last, extra=list(extra), plot=plot, alt=alt, env=env,
                           what="test" if pr.metric == "test_acc" else "validation",
                           host=hardware_text(env) if env else None, reliable_passes=RELIABLE_PASSES,
                           reliable_seeds=RELIABLE_SEEDS)
    return text.rstrip("\n").split("\n")
