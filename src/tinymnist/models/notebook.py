"""A student's Jupyter notebook, or models file, read for its definitions only: what defines the model is taken, and
nothing else runs.

The write-ups of this assignment keep their `Net` between cells that install packages (`!pip install ...`), set up
plots (`%matplotlib inline`), download MNIST, build DataLoaders and train for 15 epochs; their model.py files start
with `from torchsummary import summary` and end with a test run under `if __name__ == "__main__":`. From the code
cells of a notebook, or the whole of a models file, this takes, in order:
  - imports (one that fails, such as a package that is not installed here, is skipped with one line naming it);
  - class and function definitions;
  - plain constant assignments whose names a kept class or function uses (`dropout_value = 0.1`).
Everything else is left unrun and counted: shell lines (`!...`), magics (`%...`, and whole `%%` cells), and every
other statement (a training loop, a download, a DataLoader, a plot, a call). A class that needs a skipped name fails
when it is built, in one line naming the name, the cell (in a notebook) and the line.
"""

from __future__ import annotations

import ast
import json
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import TinyMnistError, one_line

CELL_TAG = "#cell"  # code compiled from cell N has the file name "<path>#cellN", so errors can name the cell


@dataclass
class NotebookReport:
    """What was taken from a notebook, and what was left unrun."""

    code_cells: int = 0
    cells_used: int = 0  # code cells that gave at least one definition
    statements_kept: int = 0
    statements_left: int = 0  # statements not run: loops, calls, downloads, non-constant assignments ...
    shell_and_magic_lines: int = 0  # !... and %... lines, and the lines of %% cells
    skipped_imports: list = field(default_factory=list)  # (statement text, cell, line, why)

    kind: str = "notebook"  # or "file": a models file, one chunk of code with no cells

    def lines(self) -> list[str]:
        """The report as `tinymnist models` prints it after the classes."""
        cells = f" from {self.cells_used} of {self.code_cells} code cells" if self.kind == "notebook" else ""
        out = [f"taken from the {self.kind}: {self.statements_kept} statements (imports, definitions, constants)"
               f"{cells}",
               f"left unrun: {self.statements_left} other statements"
               + (f" and {self.shell_and_magic_lines} shell or magic lines" if self.kind == "notebook" else "")]
        out += [f"skipped import: {text} ({_at(cell, line)}): {why}" for text, cell, line, why in self.skipped_imports]
        return out


def _at(cell: Optional[int], line: int) -> str:
    """'cell N, line L' in a notebook, 'line L' in a file."""
    return f"cell {cell}, line {line}" if cell is not None else f"line {line}"


def where(filename: str, lineno: int) -> Optional[str]:
    """'cell N, line L' for a frame of code compiled from a notebook cell, else None."""
    if CELL_TAG not in filename:
        return None
    return f"cell {filename.rsplit(CELL_TAG, 1)[1]}, line {lineno}"


def code_cells(path: Path, raw: bytes) -> list[tuple[int, str]]:
    """(cell number, source) of each code cell, numbered from 1 among all the notebook's cells, as Jupyter shows
    them; a file that is not a notebook is one TinyMnistError."""
    try:
        nb = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TinyMnistError(f"{path}: not a Jupyter notebook (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise TinyMnistError(f"{path}: not a Jupyter notebook (not JSON: line {e.lineno}: {e.msg})") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise TinyMnistError(f"{path}: JSON, but not a Jupyter notebook (no list of cells)")
    out = []
    for number, cell in enumerate(cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(s for s in source if isinstance(s, str))
        if not isinstance(source, str):
            raise TinyMnistError(f"{path}: cell {number} has no source text")
        out.append((number, source))
    if not out:
        raise TinyMnistError(f"{path}: the notebook has no code cell")
    return out


def _python_lines(source: str) -> tuple[str, int]:
    """The cell's source with shell lines and line magics blanked (line numbers stay), and how many were blanked;
    a %% cell magic makes the whole cell not Python."""
    lines = source.split("\n")
    if source.lstrip().startswith("%%"):
        return "", sum(1 for s in lines if s.strip())
    kept, dropped = [], 0
    for line in lines:
        if line.lstrip().startswith(("!", "%")):
            kept.append("")
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _constant(node: ast.AST) -> bool:
    """A plain constant: a literal, a tuple or list of them, or arithmetic on them (`0.1`, `-1`, `(1, 2)`, `2 ** 3`)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_constant(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _constant(node.operand)
    if isinstance(node, ast.BinOp):
        return _constant(node.left) and _constant(node.right)
    return False


def _assigned_names(node: ast.stmt) -> Optional[list[str]]:
    """The names a plain constant assignment binds, or None if `node` is not one."""
    if isinstance(node, ast.Assign) and _constant(node.value) and all(isinstance(t, ast.Name) for t in node.targets):
        return [t.id for t in node.targets]
    if isinstance(node, ast.AnnAssign) and node.value is not None and _constant(node.value) \
            and isinstance(node.target, ast.Name):
        return [node.target.id]
    return None


def load_notebook(path: Path, raw: bytes, module: types.ModuleType, log=None) -> NotebookReport:
    """Run into `module` what defines the model in the notebook `raw` (see the module's docstring); return what was
    taken and left. A syntax error is one TinyMnistError naming the cell and the line."""
    return load_definitions(path, code_cells(path, raw), module, log)


def load_source(path: Path, source: str, module: types.ModuleType, log=None) -> NotebookReport:
    """The same rule for a models file: its imports, definitions and the constants they use, nothing else."""
    return load_definitions(path, [(None, source)], module, log, kind="file")


def load_definitions(path: Path, chunks: list, module: types.ModuleType, log=None,
                     kind: str = "notebook") -> NotebookReport:
    """Run into `module` the imports, definitions and used constants of `chunks`, (cell number or None, source)
    pairs; a syntax error or a definition that raises is one TinyMnistError naming the cell (if any) and the line."""
    report = NotebookReport(kind=kind)
    parsed = []
    for number, source in chunks:
        report.code_cells += 1
        text, dropped = _python_lines(source) if number is not None else (source, 0)
        report.shell_and_magic_lines += dropped
        try:
            tree = ast.parse(text, filename=_filename(path, number))
        except SyntaxError as e:
            raise TinyMnistError(f"{path}: {_at(number, e.lineno)}: SyntaxError: {e.msg}") from None
        parsed.append((number, tree))
    used = set()  # every name a definition reads: the constants worth keeping
    for _, tree in parsed:
        for node in tree.body:
            if isinstance(node, _DEFINITIONS):
                used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    for number, tree in parsed:
        kept_here = 0
        for node in tree.body:
            names = _assigned_names(node)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                kept_here += _import(path, number, node, module, report, log)
            elif isinstance(node, _DEFINITIONS) or (names and set(names) & used):
                _run(path, number, node, module)
                kept_here += 1
            else:
                report.statements_left += 1
        report.statements_kept += kept_here
        report.cells_used += kept_here > 0
    return report


def _filename(path: Path, number: Optional[int]) -> str:
    return f"{path}{CELL_TAG}{number}" if number is not None else str(path)


def _compile(path: Path, number: Optional[int], node: ast.stmt):
    return compile(ast.Module(body=[node], type_ignores=[]), _filename(path, number), "exec")


def _run(path: Path, number: Optional[int], node: ast.stmt, module: types.ModuleType) -> None:
    """A definition or a constant: one that raises as it is defined (a decorator, a default argument, a class
    body) is one TinyMnistError naming the cell and the line."""
    try:
        exec(_compile(path, number, node), module.__dict__)  # noqa: S102 - the user's own definitions, by design
    except Exception as e:  # noqa: BLE001 - a user's code may raise anything
        ours = _filename(path, number)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == ours]
        at = _at(number, frames[-1].lineno if frames else node.lineno)
        raise TinyMnistError(f"{path}: {at}: {one_line(e)}") from None


def _import(path: Path, number: Optional[int], node: ast.stmt, module: types.ModuleType, report: NotebookReport,
            log) -> int:
    """Run one import; one that fails (a package not installed here) is skipped with one line naming it."""
    try:
        exec(_compile(path, number, node), module.__dict__)  # noqa: S102
        return 1
    except Exception as e:  # noqa: BLE001 - ImportError, or whatever a package raises as it loads
        text = ast.unparse(node)
        why = one_line(e)
        report.skipped_imports.append((text, number, node.lineno, why))
        if log is not None:
            log(f"tinymnist: note: {path}: skipped `{text}` ({_at(number, node.lineno)}): {why}")
        return 0




# ---------------------------------------------------------------- a submission's own modules

OWN_SKIP_DIRS = {".git", ".ipynb_checkpoints", "__pycache__", "venv", ".venv", "env", "site-packages", "node_modules"}
OWN_MAX_FILES, OWN_MAX_BYTES = 400, 1_000_000  # a submission is a small repository; anything larger is not read


def own_sources(root: Path, depth: int = 3) -> dict[str, str]:
    """The Python files under `root`, at most `depth` folders down, as {path relative to root: source}: what `from
    model import Net` or `from mnist.model import Net` may name. Hidden folders, environments and files over
    OWN_MAX_BYTES are not read, nor more than OWN_MAX_FILES files."""
    import os

    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if d not in OWN_SKIP_DIRS and not d.startswith(".")
                         and len(rel_folder.parts) < depth)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / name
            try:
                if len(found) < OWN_MAX_FILES and path.stat().st_size <= OWN_MAX_BYTES:
                    found[(rel_folder / name).as_posix()] = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
    return found


class OwnModules:
    """A meta-path finder for a submission's own Python files, so that a notebook's `from model import Net` or
    `from mnist.model import Net` finds the file beside it, read by the same definitions-only rule. A name is looked
    for in the file's folder first (`here`, relative to the root), then at the root: a module `a.b` is a/b.py, a
    package a/b/__init__.py, or a folder without one (a namespace package). The files come from `sources` ({path
    relative to the root: source}, read before, e.g. where the disk can no longer be read) or from the folder `root`
    on disk. `builtins`: what the modules' code sees as builtins (default: all)."""

    def __init__(self, sources: Optional[dict[str, str]] = None, here: str = ".", root: Optional[Path] = None,
                 builtins: Optional[dict] = None, log=None):
        self.sources, self.root, self.builtins, self.log = sources, root, builtins, log
        self.bases = list(dict.fromkeys([here.strip("/") or ".", "."]))
        self.found: dict[str, Optional[tuple[str, str]]] = {}  # name -> (kind, relative path), or None

    def _file(self, rel: str) -> bool:
        if self.sources is not None:
            return rel in self.sources
        return self.root is not None and (self.root / rel).is_file() and (self.root / rel).stat().st_size <= OWN_MAX_BYTES

    def _folder(self, rel: str) -> bool:
        if self.sources is not None:
            return any(k.startswith(rel + "/") for k in self.sources)
        return self.root is not None and (self.root / rel).is_dir()

    def _read(self, rel: str) -> str:
        if self.sources is not None:
            return self.sources[rel]
        return (self.root / rel).read_text(encoding="utf-8", errors="replace")

    def locate(self, name: str) -> Optional[tuple[str, str]]:
        """("module" | "package" | "namespace", its path relative to the root) of an own module, or None."""
        if name not in self.found:
            self.found[name] = None
            parts = name.split(".")
            if all(p.isidentifier() and p not in OWN_SKIP_DIRS for p in parts):
                for base in self.bases:
                    rel = "/".join(([] if base == "." else [base]) + parts)
                    if self._file(rel + ".py"):
                        self.found[name] = ("module", rel + ".py")
                    elif self._file(rel + "/__init__.py"):
                        self.found[name] = ("package", rel + "/__init__.py")
                    elif self._folder(rel):
                        self.found[name] = ("namespace", rel)
                    if self.found[name]:
                        break
        return self.found[name]

    def knows(self, name: str) -> bool:
        return self.locate(name) is not None

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery

        where = self.locate(fullname)
        if where is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=where[1], is_package=where[0] != "module")

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        kind, rel = self.locate(module.__name__)
        if kind != "module":
            module.__path__ = []
        if self.builtins is not None:
            module.__dict__["__builtins__"] = self.builtins
        if kind != "namespace":
            load_definitions(Path(rel), [(None, self._read(rel))], module, log=self.log, kind="file")

    def __enter__(self) -> "OwnModules":
        import sys

        self._before = set(sys.modules)
        sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc) -> None:
        """Out of sys.modules again: another submission's `model` must not find this one's."""
        import sys

        sys.meta_path.remove(self)
        for name in set(sys.modules) - self._before:
            if self.found.get(name):
                del sys.modules[name]
