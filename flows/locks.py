"""Process-level locks, so two flow runs on one machine never do the same work at once.

The deployments' concurrency limits guard runs that go through the Prefect
server; these locks also cover direct calls (`python -m flows.training`, a
drift check calling the training flow as a subflow).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (an advisory flock, released if the process dies).

    Args:
        path: the lock file (created if missing).
        wait: block until the lock is free; otherwise give up at once.

    Yields:
        True when the lock is held, False when `wait` is off and another process has it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
