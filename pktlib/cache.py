"""Where pktlib keeps what it generates or trains (the pocket suite, pocket pairs, run folders).

``$PKT_CACHE`` if set, else ``~/.cache/pktlib``. Builders that fill a folder there take an
inter-process lock (:func:`locked`) so that two notebooks building the same thing wait for
each other instead of both doing the work.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["cache_dir", "locked"]


def cache_dir() -> Path:
    """``$PKT_CACHE`` if set, else ``~/.cache/pktlib``."""
    env = os.environ.get("PKT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pktlib"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on file ``path`` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
