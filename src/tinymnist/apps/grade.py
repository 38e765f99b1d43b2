"""Grade a whole class: read each submission's own log, judge its claim in seconds, and retrain only where asked.

A submission is a notebook, a models file, or a folder (a cloned repository); a folder that holds only folders is a
class, one submission each. For every notebook, and every models file that no notebook of its submission imports,
one row:
  - the models, loaded and built in a child process with limits (sandbox.py), by the definitions-only rule of
    `--models` (notebook.py); a notebook's `from model import Net` is resolved inside its submission;
  - the log: the per-epoch test accuracies that the notebook's saved outputs hold (read with nbformat), with the cell
    and the form recognised (LOG_FORMS); the epochs; whether a seed was set;
  - the claim: the accuracy the README or the notebook's title states, and whether the log bears it out;
  - the verdict on its own log: the assignment's three rules (target.py) on its one run.
Nothing here trains. `--retrain N` (retrain.py) then runs tinymnist's own check of chosen rows over N seeds."""

from __future__ import annotations

import ast
import csv
import io
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import TinyMnistError, one_line
from ..fileio import atomic_path
from ..models.notebook import OWN_SKIP_DIRS, own_sources
from ..target import LAST, MAX_EPOCHS, MAX_PARAMS, THRESHOLD, budget_words, verdict_word, within

NOTEBOOK, MODELS = ".ipynb", ".py"

# The forms a training log takes, each a pattern over one line of output and how to read the accuracy (percent).
# A line is read by the first form that matches it.
LOG_FORMS: tuple[tuple[str, re.Pattern], ...] = (
    # pytorch/examples' mnist: "Test set: Average loss: 0.0195, Accuracy: 9954/10000 (99.54%)"
    ("pytorch/examples", re.compile(r"Test set:.*?Accuracy:\s*(?P<correct>\d+)\s*/\s*(?P<total>\d+)\s*"
                                    r"\((?P<pct>\d+(?:\.\d+)?)%\)", re.I)),
    # "Val Accuracy:  9954/10000 | Percent: 99.54%"
    ("correct/total | percent", re.compile(r"\b(?:test|val(?:idation)?)\s+accuracy\s*:\s*(?P<correct>\d+)\s*/\s*"
                                           r"(?P<total>\d+)\s*\|\s*percent\s*:\s*(?P<pct>\d+(?:\.\d+)?)\s*%", re.I)),
    # a tqdm bar's postfix: "100%|██████| 79/79 [00:02<00:00, test_acc=99.54]"
    ("tqdm postfix", re.compile(r"[,\[ ]\s*(?:test|val(?:idation)?)[ _-]?acc(?:uracy)?\s*=\s*(?P<pct>\d+(?:\.\d+)?)"
                                r"\s*%?\s*[,\]]?", re.I)),
    # "Test Accuracy: 99.54%", "Test accuracy = 99.54 %"
    ("test accuracy: N%", re.compile(r"\b(?:test|val(?:idation)?)\s+acc(?:uracy)?\s*[:=]\s*(?P<pct>\d+(?:\.\d+)?)\s*%",
                                     re.I)),
)
TABLE_FORM = "a printed table"  # a header with a test (or validation) accuracy column, then one row per epoch
_TABLE_HEAD = re.compile(r"(?:test|val(?:idation)?)[ _-]?acc(?:uracy)?", re.I)
_SEED = re.compile(r"\b(?:torch\.(?:cuda\.)?manual_seed(?:_all)?|np\.random\.seed|numpy\.random\.seed|random\.seed|"
                   r"seed_everything|set_seed)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\d.])(?P<n>(?:99|98|100)(?:\.\d+)?)\s*(?P<pct>%?)")
_CONSISTENT = re.compile(r"consisten|every|all of|each of|last\s*\d+|from epoch|epochs?\s*\d+\s*(?:-|–|to)\s*\d+|"
                         r">=|≥|>|above|at least", re.I)
_GOAL = re.compile(r"\b(?:target|goal|aim|achieve|try|should|must|requirement|problem)", re.I)
_EPOCH_RANGE = re.compile(r"epochs?\s*(?P<a>\d+)\s*(?:-|–|to)\s*(?P<b>\d+)", re.I)


@dataclass(frozen=True)
class Log:
    """One training log: a cell's per-epoch test accuracies, in the form it printed them."""

    cell: int
    accs: tuple[float, ...]
    form: str
    complete: bool  # the cell ended without an error (an interrupted training is not a complete log)


@dataclass(frozen=True)
class Claim:
    """What a submission says of itself: the sentence, where it stands, the number, and whether it promises the
    rule ("consistently above 99.4 from epoch 11") rather than one accuracy."""

    text: str
    source: str
    value: float
    consistency: bool
    epochs: Optional[tuple[int, int]] = None  # "from epoch 11-15"


@dataclass
class Row:
    """One graded notebook or models file: everything the class table and its card show."""

    submission: str
    file: str
    source: str = ""  # the file's absolute path: what a retraining names as its models file
    model: Optional[str] = None
    params: Optional[int] = None
    rf: str = ""
    rf_text: str = ""
    macs: Optional[int] = None
    models: list = field(default_factory=list)  # every class of the file: {name, params, rf_cell, macs, error}
    model_note: str = ""  # why no model was graded, or how the one graded was chosen
    log: Optional[dict] = None  # {cell, accs, form, complete}
    log_note: str = ""
    epochs: Optional[int] = None
    seed: str = ""
    rules: list = field(default_factory=list)  # [{rule, passed}]
    verdict: str = ""  # PASS, FAIL, or "no log"
    why: str = ""  # the first rule that fails, in words
    claim: Optional[dict] = None
    claim_note: str = ""
    notes: list = field(default_factory=list)  # skipped imports, the walls the child had
    isolation: list = field(default_factory=list)
    check: Optional[dict] = None  # a retrained check: {verdict, passes, seeds, bound, evidence}
    seconds: float = 0.0  # the time this row took to grade

    @property
    def slug(self) -> str:
        """A name for the row's card: its submission and file, safe as a file name."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.submission}--{self.file}").strip("-")


# ---------------------------------------------------------------- finding submissions


def submissions(paths: Sequence[str | Path]) -> list[tuple[str, Path, list[Path]]]:
    """(name, root, files to grade) for every submission the paths name: a notebook or models file is one
    submission; a folder with a notebook, a models file or a README at its top is one; a folder of folders is a
    class, each folder one submission. A path that does not exist is one TinyMnistError."""
    found = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TinyMnistError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix not in (NOTEBOOK, MODELS):
                raise TinyMnistError(f"{path}: not a notebook (.ipynb), a models file (.py) or a folder")
            found.append((path.stem, path.parent, [path]))
        elif _is_submission(path):
            found.append((path.name, path, _files(path)))
        else:
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found.append((sub.name, sub, _files(sub)))
    return found


def _is_submission(folder: Path) -> bool:
    return any(p.is_file() and (p.suffix in (NOTEBOOK, MODELS) or p.name.lower() == "readme.md")
               for p in folder.iterdir())


def _files(root: Path) -> list[Path]:
    """A submission's notebooks, and its models files that no notebook of it imports (they are that notebook's)."""
    def wanted(p: Path) -> bool:
        rel = p.relative_to(root).parts
        return not any(part in OWN_SKIP_DIRS or part.startswith(".") for part in rel[:-1])

    notebooks = sorted(p for p in root.rglob(f"*{NOTEBOOK}") if wanted(p))
    imported = set()
    for nb in notebooks:
        imported |= _imported_files(nb, root)
    models = sorted(p for p in root.rglob(f"*{MODELS}") if wanted(p) and p not in imported and _defines_module(p))
    return notebooks + models


def _defines_module(path: Path) -> bool:
    """Whether a Python file defines an nn.Module subclass (read as text: nothing of it runs here)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, OSError, ValueError):
        return path.name.lower().startswith("model")  # a broken model.py is still the submission's model file
    return any(isinstance(n, ast.ClassDef) and any("Module" in ast.unparse(b) for b in n.bases)
               for n in ast.walk(tree))


def _imported_files(nb: Path, root: Path) -> set[Path]:
    """The submission's own .py files a notebook's imports name (`from model import Net`, `import mnist.model`)."""
    found = set()
    try:
        cells = _code_cells(_read_notebook(nb))
    except TinyMnistError:
        return found
    for _, source in cells:
        for name in _import_names(source):
            for base in (nb.parent, root):
                for candidate in (base / Path(*name.split(".")).with_suffix(MODELS),
                                  base / Path(*name.split(".")) / "__init__.py"):
                    if candidate.is_file():
                        found.add(candidate)
    return found


def _import_names(source: str) -> list[str]:
    names = []
    for line in source.splitlines():
        m = re.match(r"\s*from\s+([\w.]+)\s+import\s+([\w, ]+)", line)
        if m and not m.group(1).startswith("."):
            names.append(m.group(1))
            names += [f"{m.group(1)}.{x.strip()}" for x in m.group(2).split(",") if x.strip()]
        m = re.match(r"\s*import\s+([\w.]+)", line)
        if m:
            names.append(m.group(1))
    return names


# ---------------------------------------------------------------- reading a notebook


def _read_notebook(path: Path):
    """The notebook, read with nbformat (any version, upgraded to v4); a file it cannot read is one TinyMnistError."""
    import nbformat

    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as e:  # noqa: BLE001 - nbformat raises JSON, validation and version errors of many kinds
        raise TinyMnistError(f"corrupt notebook: {one_line(e)[:160]}") from None


def _code_cells(nb) -> list[tuple[int, str]]:
    """(cell number from 1 among all cells, source) of each code cell."""
    return [(i, c.get("source", "")) for i, c in enumerate(nb.get("cells", []), start=1) if c.get("cell_type") == "code"]


def _output_text(cell) -> tuple[str, bool]:
    """A code cell's saved output as text (streams and plain-text results), and whether it ended in an error."""
    parts, error = [], False
    for out in cell.get("outputs", []) or []:
        kind = out.get("output_type")
        if kind == "stream":
            parts.append(out.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            parts.append((out.get("data") or {}).get("text/plain", ""))
        elif kind == "error":
            error = True
    return "".join(p if isinstance(p, str) else "".join(p) for p in parts), error


def accuracies(text: str) -> list[tuple[float, str]]:
    """Every test accuracy a cell's output states, in order, as (percent, form). A tqdm bar redraws its line with
    carriage returns: only the last state of each line counts."""
    lines = [line.split("\r")[-1] if line.split("\r")[-1].strip() else next(
        (s for s in reversed(line.split("\r")) if s.strip()), "") for line in text.split("\n")]
    found: list[tuple[float, str]] = []
    for line in lines:
        for form, pattern in LOG_FORMS:
            m = pattern.search(line)
            if m:
                if m.groupdict().get("correct") and m.group("total") and int(m.group("total")) > 0:
                    acc = 100.0 * int(m.group("correct")) / int(m.group("total"))
                else:
                    acc = float(m.group("pct"))
                if 0.0 < acc <= 100.0:
                    found.append((round(acc, 4), form))
                break
    return found or _table(lines)


def _table(lines: list[str]) -> list[tuple[float, str]]:
    """A printed table's test-accuracy column: a header naming it, then rows of numbers (a pandas index allowed)."""
    def cells(line: str) -> list[str]:
        line = line.strip().strip("|")
        return [c.strip() for c in (line.split("|") if "|" in line else re.split(r"\s{2,}|\t", line)) if c.strip()]

    for i, line in enumerate(lines):
        head = cells(line)
        column = next((j for j, h in enumerate(head) if _TABLE_HEAD.fullmatch(h.replace(" (%)", "").strip("% "))),
                      None)
        if column is None:
            continue
        out = []
        for row in lines[i + 1:]:
            values = cells(row)
            if values and set("".join(values)) <= set("-:+= "):
                continue  # a rule under the header
            if len(values) == len(head) + 1:
                values = values[1:]  # pandas prints its index first
            if len(values) != len(head):
                break
            try:
                acc = float(values[column].rstrip("%"))
            except ValueError:
                break
            out.append((round(acc * 100 if acc <= 1.0 else acc, 4), TABLE_FORM))
        if out:
            return out
    return []


def logs(nb) -> list[Log]:
    """Every cell's run of test accuracies, in cell order."""
    found = []
    for number, cell in enumerate(nb.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        text, error = _output_text(cell)
        entries = accuracies(text)
        if not entries:
            continue
        forms = [f for _, f in entries]
        form = max(dict.fromkeys(forms), key=forms.count)  # a cell that also prints a summary: its main form
        found.append(Log(number, tuple(a for a, f in entries if f == form), form, not error))
    return found


def pick_log(found: Sequence[Log]) -> tuple[Optional[Log], str]:
    """The log to grade, and what to say about the choice: the last complete log of at least 2 epochs; a lone
    accuracy printed after it (an evaluation cell) is not an epoch."""
    runs = [g for g in found if len(g.accs) >= 2]
    if not runs:
        if found:
            g = found[-1]
            return Log(g.cell, g.accs, g.form, g.complete), (f"only single accuracies printed (cell "
                                                             f"{', '.join(str(x.cell) for x in found)}): read as a "
                                                             f"log of {len(g.accs)} epoch")
        return None, "no log found: the notebook holds no saved output with a test accuracy per epoch"
    complete = [g for g in runs if g.complete]
    chosen = (complete or runs)[-1]
    notes = []
    if len(runs) > 1:
        notes.append(f"{len(runs)} logs (cells {', '.join(str(g.cell) for g in runs)}): graded the last complete one, "
                     f"cell {chosen.cell}")
    if not chosen.complete:
        notes.append(f"the log of cell {chosen.cell} ends in an error: it did not finish")
    after = [g for g in found if g.cell > chosen.cell and len(g.accs) == 1]
    if after:
        notes.append("; ".join(f"cell {g.cell} prints {g.accs[0]:.2f}% once more after the log: not counted as an "
                               "epoch" for g in after))
    return chosen, "; ".join(notes)


def seed_line(nb) -> str:
    """Where the notebook sets a seed ('torch.manual_seed(1) (cell 4)'), or '' if it never does."""
    for number, source in _code_cells(nb):
        m = _SEED.search(source)
        if m:
            return f"{m.group(0)} (cell {number})"
    return ""


def trained_class(nb, names: Sequence[str], before: Optional[int]) -> Optional[str]:
    """The class the notebook builds to train: the last call of one of `names` (`Net()`, `model.Net()`) in a code
    cell up to the log's (outside any definition)."""
    last = None
    for number, source in _code_cells(nb):
        if before is not None and number > before:
            break
        text = "\n".join("" if line.lstrip().startswith(("!", "%")) else line for line in source.split("\n"))
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                f = call.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in names:
                    last = name
    return last


# ---------------------------------------------------------------- the claim


def find_claim(readme: str, title: str, file_name: str) -> Optional[Claim]:
    """The accuracy a submission claims: in the notebook's title (its first heading) or file name, else the first
    sentence of its README that states one (98-100, not a line of a pasted log)."""
    for source, text in (("the notebook's title", title), ("the file name", file_name.replace("_", " ")),
                         ("README", readme)):
        for line in text.splitlines():
            if source == "README" and (re.search(r"Test set:|loss|Epoch\s*\d+\s*[:/]", line, re.I)
                                       or _GOAL.search(line)):
                continue  # a line of a pasted log, or the assignment's own target: not a claim
            m = _NUMBER.search(line)
            if not m:
                continue
            value = float(m.group("n"))
            if not 98.0 <= value <= 100.0:
                continue
            r = _EPOCH_RANGE.search(line)
            return Claim(line.strip().lstrip("#").strip()[:160], source, value, bool(_CONSISTENT.search(line)),
                         (int(r.group("a")), int(r.group("b"))) if r else None)
    return None


def judge_claim(claim: Claim, accs: Sequence[float]) -> str:
    """Whether the log bears the claim out, in words."""
    if not accs:
        return "no log to check it against"
    if claim.consistency:
        a, b = claim.epochs or (len(accs) - LAST + 1, len(accs))
        window = accs[a - 1:b]
        if len(window) < b - a + 1 or not window:
            return f"the log has {len(accs)} epochs, not epochs {a}-{b}"
        low = min(window)
        return (f"holds: every epoch {a}-{b} at or above {claim.value:.2f}% (lowest {low:.2f}%)" if low >= claim.value
                else f"does not hold: epoch {a + window.index(low)} logs {low:.2f}%, under the claimed {claim.value:.2f}%")
    hits = [i + 1 for i, a in enumerate(accs) if abs(a - claim.value) < 0.005]
    if hits:
        where = "the last epoch" if hits[-1] == len(accs) else f"epoch {hits[-1]}"
        best = " (its best)" if claim.value >= max(accs) - 1e-9 else ""
        return f"matches {where} of the log{best}"
    return f"not in the log: its best epoch logs {max(accs):.2f}%, its last {accs[-1]:.2f}%"


# ---------------------------------------------------------------- the rules on one run


def judge_log(params: Optional[int], accs: Sequence[float]) -> tuple[list[dict], str, str]:
    """The assignment's three rules on one logged run: (rules, verdict, the first failure in words)."""
    epochs = len(accs)
    tail = list(accs[-LAST:])
    rules = [{"rule": f"parameters {params:,} {budget_words(MAX_PARAMS)}" if params is not None else
              "parameters: no model was graded", "passed": params is not None and within(params, MAX_PARAMS)},
             {"rule": f"epochs {epochs} <= {MAX_EPOCHS}", "passed": epochs <= MAX_EPOCHS},
             {"rule": (f"every one of the last {LAST} test accuracies >= {THRESHOLD:.2f}% (lowest {min(tail):.2f}%)"
                       if epochs >= LAST else f"the last {LAST} test accuracies >= {THRESHOLD:.2f}%: the log has "
                                              f"only {epochs} epoch{'s' * (epochs != 1)}"),
              "passed": epochs >= LAST and min(tail) >= THRESHOLD}]
    why = ""
    if not rules[0]["passed"]:
        why = "no model was graded" if params is None else f"{params:,} parameters: not {budget_words(MAX_PARAMS)}"
    elif not rules[1]["passed"]:
        why = f"{epochs} epochs: more than {MAX_EPOCHS}"
    elif epochs < LAST:
        why = f"{epochs} epoch{'s' * (epochs != 1)} logged: fewer than the rule's last {LAST}"
    elif not rules[2]["passed"]:
        first = next(i for i, a in enumerate(tail) if a < THRESHOLD)
        why = f"epoch {epochs - len(tail) + first + 1} logs {tail[first]:.2f}%"
    return rules, verdict_word(all(r["passed"] for r in rules)), why


# ---------------------------------------------------------------- one file


def grade_file(name: str, root: Path, path: Path, base: Path, limits=None) -> Row:
    """Grade one notebook or models file of a submission; never raises for the submission's sake."""
    from ..models.sandbox import Job, Limits, load_in_child

    t0 = time.perf_counter()
    row = Row(submission=name, file=_rel(path, base), source=str(path.resolve()))
    nb = None
    if path.suffix == NOTEBOOK:
        try:
            nb = _read_notebook(path)
        except TinyMnistError as e:
            row.verdict, row.why, row.model_note = "not graded", str(e), str(e)
            row.seconds = time.perf_counter() - t0
            return row
        chunks = tuple(_code_cells(nb))
    else:
        try:
            chunks = ((None, path.read_text(encoding="utf-8", errors="replace")),)
        except OSError as e:
            row.verdict = row.why = f"cannot read: {e.strerror or e}"
            return row
    own = tuple(own_sources(root).items())
    here = path.parent.relative_to(root).as_posix() if path.parent != root else "."
    record = load_in_child(Job(row.file, chunks, own, here, "notebook" if nb is not None else "file"),
                           limits or Limits())
    row.models, row.isolation = record["models"], record["isolation"]
    row.notes = [_short_note(n, row.file) for n in record["notes"]]
    # the log, before the model: the class it trains is the one the log's cell (or one before it) builds
    chosen = None
    if nb is not None:
        chosen, row.log_note = pick_log(logs(nb))
        row.seed = seed_line(nb) or "no seed set"
    else:
        row.log_note = "a models file holds no log"
    built = [m for m in row.models if m.get("params") is not None and not m.get("error")]
    pick = None
    if built:
        trained = trained_class(nb, [m["name"] for m in built], chosen.cell if chosen else None) if nb else None
        pick = next((m for m in built if m["name"] == trained), None)
        if pick is not None:
            row.model_note = f"the class the notebook builds before its log ({pick['name']}())"
        else:
            pick = built[-1] if nb is not None else min(built, key=lambda m: m["params"])
            row.model_note = ("the last class it defines" if nb is not None else "its smallest class") + \
                (f" (of {len(built)})" if len(built) > 1 else "")
        row.model, row.params, row.rf, row.rf_text, row.macs = (pick["name"], pick["params"], pick["rf_cell"],
                                                                pick["rf_text"], pick["macs"])
    else:
        why = record["failure"] or "; ".join(m["error"] for m in row.models if m.get("error")) or "no model"
        row.model_note = f"its model was not graded: {why}"
    if chosen is not None:
        row.log = asdict(chosen)
        row.epochs = len(chosen.accs)
        row.rules, row.verdict, row.why = judge_log(row.params, chosen.accs)
    else:
        row.verdict, row.why = "no log", row.log_note
    readme = next((p for p in (path.parent / "README.md", root / "README.md", path.parent / "readme.md",
                               root / "readme.md") if p.is_file()), None)
    title = _title(nb) if nb is not None else ""
    claim = find_claim(readme.read_text(encoding="utf-8", errors="replace") if readme else "", title, path.stem)
    if claim is not None:
        row.claim = asdict(claim)
        row.claim_note = judge_claim(claim, chosen.accs if chosen else ())
    row.seconds = time.perf_counter() - t0
    return row


def _title(nb) -> str:
    """A notebook's title: its first markdown heading."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in cell.get("source", "").splitlines():
                if line.lstrip().startswith("#"):
                    return line.lstrip("# ").strip()
    return ""


def _short_note(line: str, file: str) -> str:
    """A loader's note as a card lists it: without the prefix and the file's name, which the card names."""
    return line.removeprefix("tinymnist: note: ").removeprefix(f"{file}: ")


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def grade(paths: Sequence[str | Path], limits=None, log=print) -> list["Row"]:
    """Grade every submission the paths name; one line per graded file as it goes. Rows sorted by parameters."""
    rows = []
    for name, root, files in submissions(paths):
        base = root.parent
        if not files:
            rows.append(Row(submission=name, file="—", verdict="not graded",
                            why="no notebook and no models file found", model_note="no notebook and no models file"))
            log(f"{name}: no notebook and no models file found")
            continue
        for path in files:
            row = grade_file(name, root, path, base, limits)
            rows.append(row)
            log(summary_line(row))
    return sort_rows(rows)


def sort_rows(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.params is None, r.params or 0, r.submission, r.file))


def summary_line(row: Row) -> str:
    """One line per graded file, as `grade` prints it."""
    model = f"{row.model} ({row.params:,} params)" if row.params is not None else row.model_note
    if row.verdict in ("PASS", "FAIL"):
        return f"{row.file}: {model}: {row.verdict} on its own log" + (f" ({row.why})" if row.why else "")
    return f"{row.file}: {model}: {row.why}" if row.why != row.model_note else f"{row.file}: {row.why}"


# ---------------------------------------------------------------- the class table and the cards

COLUMNS = ("submission", "file", "model", "parameters", "RF", "epochs", f"last {LAST} logged test accuracies",
           "verdict on its log", "claim", "retrained check")


def _cells(row: Row) -> list[str]:
    last = ", ".join(f"{a:.2f}" for a in row.log["accs"][-LAST:]) if row.log else "—"
    verdict = row.verdict + (f": {row.why}" if row.why and row.verdict == "FAIL" else "")
    claim = (f"{row.claim['value']:.2f}% ({row.claim['source']}): {row.claim_note}" if row.claim else "none found")
    check = (f"{row.check['verdict']}, {row.check['passes']} of {row.check['seeds']} seeds (rate ≥ "
             f"{row.check['bound']:.2f})" if row.check else "—")
    return [row.submission, row.file, row.model or f"— ({row.model_note})", f"{row.params:,}" if row.params else "—",
            row.rf or "—", str(row.epochs) if row.epochs else "—", last, verdict, claim, check]


def markdown_table(rows: Sequence[Row], cards: Optional[Path] = None, page: Optional[Path] = None) -> str:
    """The class table: one row per notebook or models file, sorted by parameters, each linking to its card."""
    import os

    out = ["| # | " + " | ".join(COLUMNS) + " | card |", "| ---: | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for i, row in enumerate(rows, 1):
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        link = "—"
        if cards is not None:
            target = cards / f"{row.slug}.md"
            link = f"[card]({os.path.relpath(target, page.parent if page else Path('.')).replace(os.sep, '/')})"
        out.append(f"| {i} | " + " | ".join(cells) + f" | {link} |")
    return "\n".join(out)


def csv_text(rows: Sequence[Row]) -> str:
    """The class table as CSV, numbers as numbers."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["submission", "file", "model", "parameters", "rf", "macs", "epochs", "last_accuracies", "verdict",
                "why", "claim", "claim_source", "claim_check", "seed", "check_verdict", "check_passes", "check_seeds",
                "check_rate_bound", "seconds"])
    for r in rows:
        w.writerow([r.submission, r.file, r.model or "", r.params if r.params is not None else "", r.rf,
                    r.macs if r.macs is not None else "", r.epochs or "",
                    " ".join(f"{a:.2f}" for a in r.log["accs"][-LAST:]) if r.log else "", r.verdict, r.why,
                    r.claim["value"] if r.claim else "", r.claim["source"] if r.claim else "", r.claim_note, r.seed,
                    r.check["verdict"] if r.check else "", r.check["passes"] if r.check else "",
                    r.check["seeds"] if r.check else "", round(r.check["bound"], 4) if r.check else "",
                    round(r.seconds, 3)])
    return buf.getvalue()


def card(row: Row, evidence: Optional[dict] = None, plot: Optional[str] = None) -> str:
    """A row's card, like the check's report card: the model, its own log judged by the rules, the claim, and the
    retrained check where there is one."""
    out = [f"### {row.submission}: `{row.file}`", ""]
    if row.model:
        out += ["| model | parameters | receptive field | MACs per image | epochs logged | verdict on its log |",
                "| --- | ---: | --- | ---: | ---: | --- |",
                f"| `{row.model}` | {row.params:,} | {row.rf} | {row.macs:,} | {row.epochs or '—'} | **{row.verdict}** |",
                "", f"Model graded: {row.model_note}. Receptive field at the output: {row.rf_text}."]
    else:
        out += [f"Not graded: {row.model_note}." if row.model_note else "Not graded."]
    if len(row.models) > 1:
        out += ["", "Every class of the file: " + "; ".join(
            f"`{m['name']}` " + (f"{m['params']:,} parameters" if m.get("params") is not None and not m.get("error")
                                 else m.get("error") or "not built") for m in row.models) + "."]
    out += ["", "#### Its own log", ""]
    if row.log:
        out += [f"Cell {row.log['cell']}, read as {row.log['form']}" + (f"; {row.log_note}" if row.log_note else "")
                + f". Seed: {row.seed}.", "", "| epoch | test accuracy (%) |", "| ---: | ---: |"]
        out += [f"| {i} | {a:.2f} |" for i, a in enumerate(row.log["accs"], 1)]
        out += [""] + [f"- {'✅' if r['passed'] else '❌'} {r['rule']}" for r in row.rules]
    else:
        out += [row.log_note + "."]
    out += ["", "#### Its claim", ""]
    out += [f"“{row.claim['text']}” ({row.claim['source']}): {row.claim_note}." if row.claim else
            "No accuracy claimed in the README or the title."]
    if row.notes:
        out += ["", "While loading: " + "; ".join(row.notes) + "."]
    if row.isolation:
        from ..models.sandbox import ALLOWED_IMPORTS

        out += ["", f"Loaded and built in a child process with {', '.join(row.isolation)}; imports allowed: "
                    f"{', '.join(ALLOWED_IMPORTS[:-1])} and the submission's own files."]
    if evidence is not None:
        from ..pages.render import proof_lines

        out += ["", "#### Retrained with tinymnist's check", ""]
        out += proof_lines(evidence, plot, f"{row.model}: test accuracy per epoch, every seed")
    return "\n".join(out) + "\n"


def timing_line(rows: Sequence[Row], seconds: float, limit: float) -> str:
    """How long the grading took and on what, as the command prints it and the page states it."""
    from ..accel.device import cpu_info
    from ..pages.common import hardware_text

    times = sorted(r.seconds for r in rows)
    slow = sum("timed out" in r.model_note for r in rows)
    import torch

    return (f"graded {len(rows)} files in {seconds:.1f} s (median {times[len(times) // 2] if times else 0:.2f} s a "
            f"file" + (f"; {slow} hit the {limit:g} s limit" if slow else "") + f") on "
            f"{hardware_text({'hardware': cpu_info()})}, torch {torch.__version__}")


def write_outputs(rows: Sequence[Row], markdown: Optional[str], csv_path: Optional[str],
                  evidence: Optional[dict] = None, timing: str = "") -> list[Path]:
    """The table (Markdown, beside it a folder of cards named after it) and the CSV, each written atomically.
    `evidence`: {row slug: (a retrained check's evidence, its plot path)}; `timing`: timing_line's words."""
    import os

    written = []
    evidence = evidence or {}
    if markdown:
        page = Path(markdown)
        cards = page.with_suffix("")
        cards.mkdir(parents=True, exist_ok=True)
        for row in rows:
            ev, plot = evidence.get(row.slug, (None, None))
            link = os.path.relpath(plot, cards).replace(os.sep, "/") if plot else None
            with atomic_path(cards / f"{row.slug}.md") as tmp:
                tmp.write_text(card(row, ev, link))
        passed = sum(r.verdict == "PASS" for r in rows)
        head = [f"# Graded: {len(rows)} notebooks and models files", "",
                f"`tinymnist grade` read each submission's own log and judged it by the assignment's rules "
                f"(at least {THRESHOLD:.2f}% test accuracy in every one of the last {LAST} epochs, within "
                f"{MAX_EPOCHS} epochs, {budget_words(MAX_PARAMS)} parameters): {passed} pass on their own log. "
                "Sorted by parameters; each card shows the log, the rules and the claim."
                + (f" Measured: {timing}." if timing else ""), ""]
        with atomic_path(page) as tmp:
            tmp.write_text("\n".join(head) + "\n" + markdown_table(rows, cards, page) + "\n")
        written.append(page)
    if csv_path:
        with atomic_path(csv_path) as tmp:
            tmp.write_text(csv_text(rows))
        written.append(Path(csv_path))
    return written
