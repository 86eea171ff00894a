"""Errors meant for the user: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations


class PktError(Exception):
    """A user error (bad input, missing file, unsupported model): one clear line, no traceback."""


class DataError(PktError, ValueError):
    """Malformed data file; the message names the file and, where known, the line."""

    def __init__(self, path, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line
