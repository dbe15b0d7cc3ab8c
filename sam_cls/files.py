"""Opening files as regular files only: a symlink is never followed and a FIFO or device never blocks a read.

A run directory's files are read and written by path; a symlink planted there (`metrics.jsonl -> ~/.bashrc`)
would make a writer overwrite the file it points to, and a FIFO named like an input (`index.faiss`, `x.png`)
would make a reader wait forever. Every such open goes through open_regular, which refuses both in one line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFileError(OSError):
    """A path names a symlink, FIFO, device, socket or directory where a regular file was expected."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def refuse(path: str | Path, what: str) -> NotRegularFileError:
    return NotRegularFileError(errno.EINVAL, f"is {what}, not a regular file: sam-cls opens regular files only "
                                             "(replace it with the file itself)", str(path))


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o644, follow: bool = False) -> int:
    """os.open that opens only a regular file (or creates one) and, unless follow (an input the user named, which
    may be a link they made), no symlink in the last component; returns the fd. O_NONBLOCK keeps a FIFO from
    blocking the open; it is cleared once the file is known to be regular."""
    try:
        fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW) | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse(path, "a symbolic link") from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise refuse(path, "a FIFO") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refuse(path, _kind(st.st_mode))
    os.set_blocking(fd, True)
    return fd


def open_file(path: str | Path, how: str = "rb", follow: bool = False):
    """A Python file object over open_regular: "rb", "wb" (create or truncate), "ab" (create, append)."""
    flags = {"rb": os.O_RDONLY, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[how]
    return os.fdopen(open_regular(path, flags, follow=follow), how)


def check_regular(path: str | Path, follow: bool = False) -> None:
    """Raise NotRegularFileError unless path is a regular file (following a final symlink only if follow)."""
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(path, _kind(st.st_mode))


def read_bytes(path: str | Path, follow: bool = False) -> bytes:
    with open_file(path, "rb", follow) as f:
        return f.read()
