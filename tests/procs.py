"""Processes as /proc shows them: the children of a process, and whether one still runs (not a zombie)."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _field(int(p.name), 1) == str(pid)]


def alive(pid: int) -> bool:
    state = _field(pid, 0)
    return state is not None and state != "Z"


def _field(pid: int, i: int) -> str | None:
    """Field i after the command name of /proc/<pid>/stat (0: state, 1: parent pid), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[i]
    except (OSError, IndexError):
        return None
