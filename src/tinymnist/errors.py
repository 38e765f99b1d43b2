"""Errors that reach the user as one clear line instead of a traceback."""


class TinyMnistError(Exception):
    """A problem the user can fix: bad data, a bad value, a missing file."""


class DataError(TinyMnistError):
    """MNIST files are missing, corrupt or could not be downloaded."""


class UsageError(TinyMnistError):
    """A bad command-line value found after parsing (a model name that a --models file does not define): exit 2."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message ('' if it has none): all that one line of output shows of
    it. An error that wraps another (SQLAlchemy's .orig) shows the wrapped one's."""
    lines = [s.strip() for s in str(getattr(e, "orig", None) or e).strip().splitlines() if s.strip()]
    return lines[0] if lines else ""


def one_line(e: BaseException) -> str:
    """An exception as one line: "ValueError: its first line", or the class name alone."""
    line = first_line(e)
    return f"{e.__class__.__name__}: {line}" if line else e.__class__.__name__


def install_hint(extra: str) -> str:
    """How to install an optional extra, as the README installs tinymnist (from its checkout, into .venv): the one
    wording that help texts, errors and docs share."""
    return f".venv/bin/pip install -e '.[{extra}]'"
