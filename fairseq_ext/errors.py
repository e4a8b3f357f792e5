"""User-input errors: one clear line and a non-zero exit instead of a traceback."""

import sys

PREFIX = "fairseq_ext: error:"


class UserInputError(ValueError):
    """Bad input from the user (a file, a flag, an environment variable); the message says what to change."""


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, UserInputError):
        print(f"{PREFIX} {exc}", file=sys.stderr, flush=True)
        return
    _default(exc_type, exc, tb)


def install_excepthook() -> None:
    """Print :class:`UserInputError` as one line (exit status stays 1); other errors keep their traceback."""
    sys.excepthook = _excepthook
