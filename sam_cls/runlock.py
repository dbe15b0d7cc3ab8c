"""The run directory's write lock: an OS lock on the directory itself, so deleting a file cannot lose it.

A lock on a `.lock` file is lost when the file is unlinked (a second writer creates a new one and locks that);
the directory cannot be unlinked while it holds the run, so flock on it excludes every other writer for as long
as the holder lives, and the kernel drops it with the process. `.lock` only tells people (and the error a second
writer prints) which process holds it; it is replaced by rename, never written through a symlink.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sam_cls.files import open_file, read_bytes

HOLDER = ".lock"  # the holder's process id, for people


class Locked(Exception):
    """Another process holds the lock; args[0] is its process id as the holder file says (or 'unknown')."""


def acquire(path: Path) -> int:
    """Lock the directory `path` (created if missing) for this process; returns the fd that holds the lock."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Locked(holder(path)) from None
    try:
        _write_holder(path)
    except BaseException:
        release(fd)
        raise
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def holder(path: Path) -> str:
    """The holder's process id as its file says, or 'unknown' (not written yet, deleted, or not a file)."""
    try:
        return read_bytes(path / HOLDER)[:64].decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _write_holder(path: Path) -> None:
    """`.lock` := this pid, by rename: a symlink or FIFO left in its place is replaced, never written through."""
    tmp = path / f"{HOLDER}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        with open_file(tmp, "wb") as f:
            f.write(f"{os.getpid()}\n".encode())
        os.replace(tmp, path / HOLDER)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
