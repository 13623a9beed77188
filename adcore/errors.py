"""Errors a user can fix: the entry points print their message in one line, without a traceback.

Every error type a user can hit through a command (a folder that is not there, an artifact that is not
one, a mistyped name, a malformed URI) derives from :class:`UserError`; ``adcore.cli.run_command``
catches exactly these (``-v`` shows the traceback too). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CLOSE_MATCHES = 3  # names suggested for a mistyped one


class UserError(Exception):
    """An error whose message tells the user what to change."""


class UnknownNameError(UserError, KeyError, ValueError):
    """A name (preset, family, subcommand) that is not among the known ones."""

    def __init__(self, what: str, name: str, known: Iterable[str]):
        self.what, self.name, self.known = what, name, sorted(known)
        super().__init__(f"unknown {what} {name!r}; {suggest(str(name), self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (self.what, self.name, self.known))


def suggest(name: str, known: Iterable[str]) -> str:
    """``did you mean a, b?`` with the closest known names, or the whole list when none is close."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=CLOSE_MATCHES, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"choose from {', '.join(known)}"


class DataNotFoundError(UserError, FileNotFoundError):
    """An input folder, file or prefix that does not exist."""


class StorageURIError(UserError, ValueError):
    """A location that is neither a local path nor a well-formed ``s3://bucket/prefix`` URI."""


class FlagError(UserError, ValueError):
    """Flags that do not go together, or a flag the chosen model does not read."""
