"""The package's layers: every import of every module goes to its own layer or a lower one (tinymnist/layers.py)."""

import ast
from pathlib import Path

import pytest

from tinymnist.layers import LAYERS, layer_of, rank

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tinymnist"


def _module(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module under tinymnist) for every import of the package in a file, at any depth, relative or absolute."""
    here = _module(path, root).split(".") if _module(path, root) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [f"{target}.{a.name}" if target else a.name for a in node.names] if not node.module else [target]
            elif node.module and node.module.split(".")[0] == "tinymnist":
                target = node.module.partition(".")[2]
                names = [f"{target}.{a.name}" if target else a.name for a in node.names] if target in (
                    "", *[n for n, _ in LAYERS]) else [target]
            else:
                continue
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.partition(".")[2]) for a in node.names if a.name.startswith("tinymnist.")]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of(_module(path, root) or "__init__")
        for line, target in imports_of(path, root):
            theirs = layer_of(target)
            if rank(theirs) > rank(mine):
                out.append(f"{path.relative_to(root)}:{line} ({mine}) imports {target} ({theirs})")
    return out


def test_no_layer_imports_a_higher_one():
    assert violations() == []


def test_every_module_lives_in_a_named_layer():
    names = {n for n, _ in LAYERS}
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0]
        assert path.parent == PACKAGE or top in names, f"{path}: not in a layer's package"


@pytest.mark.parametrize("source, found", [
    ("from ..lab.check import proof\n", "core/engine.py:1 (core) imports lab.check (lab)"),
    ("from tinymnist.pages import plots\n", "core/engine.py:1 (core) imports pages.plots (pages)"),
    ("def f():\n    import tinymnist.apps.demo\n", "core/engine.py:2 (core) imports apps.demo (apps)"),
])
def test_an_import_up_is_found(tmp_path, source, found):
    """The check itself: a lower layer that imports a higher one, at the top or inside a function, is named."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "engine.py").write_text(source)
    (tmp_path / "errors.py").write_text("from .core import engine\n")  # base importing core: also up
    got = violations(tmp_path)
    assert found in got
    assert "errors.py:1 (base) imports core (core)" in got
