"""The process tree under a pid, from /proc: used by bench.manycore and by the tests'
process helpers (tests/rigs.py), so both find and kill pool children
the same way."""

from __future__ import annotations

import os
import signal
from typing import Dict, List

MAX_PROCESSES = 10_000
"""Bound of the walk (a pid table this deep would be a runaway fork)."""


def descendants(pid: int) -> List[int]:
    """Pids of the live processes below `pid`. Pool children leave the pool's
    process group (setpgrp), so they are found and killed by pid."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    for _ in range(MAX_PROCESSES):
        if not todo:
            break
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants(pid: int) -> None:
    """SIGKILL every live process below `pid` (those already gone are skipped)."""
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
