"""The package's layers, lowest first: a module imports only from its own layer and the layers below it.

The base (errors, fileio, target, version and this file) is what every layer may use; the top is the API: the
command line, and the package's __init__, which applies the runtime policy before torch loads and names the public
API. tests/test_layers.py holds
every import of the package to this order, and the code map in docs/usage.md is drawn from it."""

LAYERS = (
    ("base", "errors, file writes, the assignment's rule and the version: what every layer may use"),
    ("accel", "speed on this machine"),
    ("models", "the networks, and a user's models"),
    ("core", "training"),
    ("lab", "the experiments"),
    ("pages", "the documentation, from results/"),
    ("apps", "what uses a trained model, or grades others'"),
    ("api", "the command line, and the package's public names (re-exported on first use by __init__.py)"),
)


def layer_of(module: str) -> str:
    """The layer of a module named from the package down ("core.engine", "errors", "cli", "__init__")."""
    head = module.split(".")[0]
    names = [name for name, _ in LAYERS]
    if head in names:
        return head
    return "api" if head in ("cli", "__init__") else "base"


def rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)
