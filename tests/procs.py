"""Processes as the tests see them through /proc: alive (a zombie is dead: this container's init does not reap
what is reparented to it), children of a process, and processes whose command line holds a marker."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; [] when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def alive(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"])


def wait_dead(pids: int | list[int], within_s: float = 10.0) -> bool:
    """Whether every one of ``pids`` is dead within ``within_s`` seconds."""
    pids = [pids] if isinstance(pids, int) else pids
    deadline = time.monotonic() + within_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(alive, pids))


def children(pid: int) -> list[int]:
    return [p for p in _pids() if _stat(p)[1:2] == [str(pid)]]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def with_cmdline(marker: bytes, *, prefix: bool = False) -> list[int]:
    """Live processes whose command line contains ``marker`` (or starts with it)."""
    out = []
    for p in _pids():
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if (cmdline.startswith(marker) if prefix else marker in cmdline) and alive(p):
            out.append(p)
    return out
