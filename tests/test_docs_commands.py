"""Every `tinymnist ...` command in README.md and docs/*.md, as a user would type it, parses with the CLI's own
parser (flags, choices, arity), and every file it reads exists in the repository or is a visible placeholder."""

import re
import shlex
from pathlib import Path

import pytest

from tinymnist.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
READS = ("checkpoint", "models", "space", "file", "images", "run_dir", "target")  # what a command reads
INLINE = re.compile(r"`((?:\.venv/bin/)?tinymnist [^`]+)`")


def commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each tinymnist command in a page: code-block lines (continuations joined, && and
    comments split off) and inline code spans."""
    out, in_code, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            out += [(n, m) for m in INLINE.findall(line)]
            continue
        if not pending:
            start = n
        pending += (line.strip() if pending else line.rstrip()).rstrip("\\").rstrip() + " "
        if line.rstrip().endswith("\\"):
            continue
        for part in re.split(r"&&|;", pending):
            part = part.strip()
            if part.startswith((".venv/bin/tinymnist ", "tinymnist ")) or part in ("tinymnist", ".venv/bin/tinymnist"):
                out.append((start, part))
        pending = ""
    return out


METAVAR = re.compile(r"^[A-Z][A-Z_]*(\.[a-z]+)?$")  # N, STEP, SPACE.toml, FILE.py: a name the reader fills in


def synopsis(tokens: list[str]) -> bool:
    """A usage summary (`tinymnist check [STEP] [--seeds N] ...`), not a command to type."""
    return any(t.startswith("[") or t in ("...", "…") or METAVAR.match(t) for t in tokens)


def problems(cmd: str) -> list[str]:
    """What is wrong with one documented command ([] if it is right)."""
    tokens = shlex.split(cmd, comments=True)[1:]
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    if not tokens:
        return []
    if len(tokens) == 1 and tokens[0] in verbs:  # `tinymnist predict` in a sentence names the verb
        return []
    if synopsis(tokens):  # a summary: its verb and every flag it names exist
        if METAVAR.match(tokens[0]):  # `tinymnist COMMAND --help`
            return []
        sub = verbs.get(tokens[0])
        if sub is None:
            return [f"no verb {tokens[0]!r}"]
        flags = {o for a in sub._actions for o in a.option_strings}
        return [f"{tokens[0]} has no option {t}" for t in (t.strip("[]") for t in tokens) if t.startswith("--")
                and t.split("=")[0] not in flags]
    try:
        args = parser.parse_args(tokens)
    except SystemExit:
        return ["does not parse (the CLI's own parser refused it)"]
    found = []
    for dest in READS:
        values = getattr(args, dest, None)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, str) and "://" not in v and "<" not in v and not (ROOT / v).exists():
                found.append(f"{dest} {v!r} is neither in the repository nor a <placeholder>")
    return found


def test_every_documented_command_parses_and_names_real_files():
    seen, wrong = 0, []
    for page in PAGES:
        for n, cmd in commands(page.read_text()):
            seen += 1
            wrong += [f"{page.relative_to(ROOT)}:{n}: {cmd}: {p}" for p in problems(cmd)]
    assert seen > 40 and not wrong, "\n".join(wrong)


@pytest.mark.parametrize("good, bad", [
    ("tinymnist check final --seeds 5 --json x.json", "tinymnist check final --seed 5 --json x.json"),
    ("tinymnist check [STEP] [--seeds N] [--jobs J]", "tinymnist check [STEP] [--sedes N] [--jobs J]"),
    ("tinymnist train --scheduler onecycle", "tinymnist train --scheduler onecycel"),
    ("tinymnist summary Model_4 --models examples/writeup_000_model.py",
     "tinymnist summary Model_4 --models examples/writeup_000_modle.py"),
    ("tinymnist predict runs/<run>/model.pt <digit>.png", "tinymnist predict runs/<run>/model.pt"),
])
def test_a_misspelt_flag_choice_file_or_missing_argument_is_caught(good, bad):
    assert problems(good) == [] and problems(bad)


def test_commands_are_found_in_code_blocks_continuations_and_inline_spans():
    text = ("Run `tinymnist check final --seeds 2` first.\n```bash\npython3 -m venv .venv && .venv/bin/tinymnist train\n"
            "tinymnist sweep spaces/frontier-7000.toml \\\n    --trials 4   # resumes\n```\n")
    assert commands(text) == [(1, "tinymnist check final --seeds 2"), (3, ".venv/bin/tinymnist train"),
                              (4, "tinymnist sweep spaces/frontier-7000.toml --trials 4   # resumes")]


def test_docs_and_messages_give_one_install_hint():
    from tinymnist.errors import install_hint

    for page in PAGES:
        for extra in re.findall(r"pip install -e '\.\[(\w+)\]'", page.read_text()):
            assert install_hint(extra) in page.read_text(), (page.name, extra)
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}
    assert install_hint("sweep") in helps["sweep"] and install_hint("onnx") in helps["export"]
