"""Errors that reach the user as one clear line instead of a traceback."""


class TinyMnistError(Exception):
    """A problem the user can fix: bad data, a bad value, a missing file."""


class DataError(TinyMnistError):
    """MNIST files are missing, corrupt or could not be downloaded."""


class UsageError(TinyMnistError):
    """A bad command-line value found after parsing (a model name that a --models file does not define): exit 2."""
