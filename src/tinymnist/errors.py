"""Errors that reach the user as one clear line instead of a traceback."""


class TinyMnistError(Exception):
    """A problem the user can fix: bad data, a bad value, a missing file."""


class DataError(TinyMnistError):
    """MNIST files are missing, corrupt or could not be downloaded."""


class UsageError(TinyMnistError):
    """A bad command-line value found after parsing (a model name that a --models file does not define): exit 2."""


def install_hint(extra: str) -> str:
    """How to install an optional extra, as the README installs tinymnist (from its checkout, into .venv): the one
    wording that help texts, errors and docs share."""
    return f".venv/bin/pip install -e '.[{extra}]'"
