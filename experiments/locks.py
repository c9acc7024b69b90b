"""Per-cell locks, so that concurrent runs on one results directory split the work.

Two ``vtprune run`` on one folder, or the tasks of a Slurm job array writing to one shared folder,
each take a cell's lock (``cells/<key>/.lock``) before running it; a cell whose lock another
process holds is left to that process (the summary lists it as still running). The lock is a
POSIX record lock (``fcntl.lockf``): the kernel (or the NFS lock manager on a shared file system)
releases it when the holding process exits, even when it is killed, so no stale lock outlives a
crash. Where ``fcntl`` does not exist (Windows) cells are not locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["cell_lock", "LOCK_NAME"]

LOCK_NAME = ".lock"
"""The lock file's name inside a cell's folder."""


@contextlib.contextmanager
def cell_lock(folder: Path) -> Iterator[bool]:
    """Try to lock ``folder`` (a cell's folder) without waiting: yields True while this process
    holds the lock, False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: run unlocked
        yield True
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}@{os.uname().nodename}\n".encode())
            yield True
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
