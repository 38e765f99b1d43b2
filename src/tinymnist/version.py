"""The package's version, in one place: pyproject.toml's, which a run records beside its recipe."""

__version__ = "0.1.0"
