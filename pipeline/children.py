"""Child processes that end when the process that started them dies, however it dies.

A parent killed with SIGKILL (the OOM killer, a node drain) runs no cleanup,
so its children (the temporary Prefect server, local training workers) would
live on, re-parented to init, holding ports and memory. On Linux each child
asks the kernel for a signal when its parent dies (`prctl(PR_SET_PDEATHSIG)`),
set between fork and exec so that no code of the child's has to cooperate.
Python's subprocess has no option for it, hence the few lines of ctypes here.

The kernel sends the signal when the *thread* that forked the child ends, so
start children from a thread that outlives them (the main thread, or the one
that waits for them).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded once in the parent (a child between fork and exec should load nothing)."""
    if not sys.platform.startswith("linux"):
        log.warning(
            "children are not tied to their parent on %s (no prctl): a killed run may leave its "
            "temporary Prefect server or training workers running",
            sys.platform,
        )
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child receive `sig` when this process dies.

    Args:
        sig: the signal the child gets (SIGTERM lets servers shut down cleanly).

    Returns:
        The function for `subprocess.Popen(preexec_fn=...)`, or None off Linux (logged once).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def tie_to_parent() -> None:  # runs in the child, after fork, before exec
        if prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the tie was made: never exec
            os._exit(1)

    return tie_to_parent


def start(args: Sequence[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen(args, **popen)` for a child that ends when this process dies.

    Call it from a thread that lives as long as the child (see the module docstring).

    Args:
        args: the command line.
        **popen: any other `subprocess.Popen` keyword (env, cwd, stdout, ...), but not `preexec_fn`.

    Returns:
        The started child.
    """
    return subprocess.Popen(args, preexec_fn=die_with_parent(), **popen)
