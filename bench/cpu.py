"""Where a task's CPU goes: the producer, the worker's processes, the broker's.

On a machine whose cores are all busy during a run (a producer, a worker
and a broker on two cores), tasks per second are the cores divided by the
CPU each task costs, so this says why one setup is faster than another:

    with CpuSplit(worker_pid, broker="postgres") as split:
        ... run n tasks ...
    split.per_task(n)  # {"producer": ms, "worker": ms, "broker": ms, "other": ms}

Read from ``/proc`` (Linux): the worker is its process and every process
below it, the broker every process whose command name starts with the
broker's (``postgres``, ``beam.smp``, ``redis-server``), the producer this
process. ``other`` is everything else that ran meanwhile (the kernel's own
threads, anything sharing the machine). Elsewhere it measures nothing and
says so.
"""

from __future__ import annotations

import os
from typing import Any

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    return os.path.exists("/proc/self/stat")


def _processes() -> dict[int, tuple[str, int, float]]:
    """pid -> (command name, parent pid, CPU seconds so far) of every process."""
    out: dict[int, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may hold spaces.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _below(root: int, procs: dict[int, tuple[str, int, float]]) -> set[int]:
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, (_, parent, _) in procs.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


class CpuSplit:
    """CPU used by the producer, the worker and the broker between enter and exit."""

    def __init__(self, worker_pid: int, broker: str) -> None:
        self.worker_pid = worker_pid
        self.broker = broker  # a command name prefix
        self.used: dict[str, float] = {}
        self._before: dict[int, tuple[str, int, float]] = {}

    def __enter__(self) -> CpuSplit:
        self._before = _processes() if available() else {}
        return self

    def __exit__(self, *exc: Any) -> None:
        if not available():
            return
        after = _processes()
        worker = _below(self.worker_pid, after) | _below(self.worker_pid, self._before)
        used = {"producer": 0.0, "worker": 0.0, "broker": 0.0, "other": 0.0}
        for pid, (name, _, cpu) in after.items():
            spent = cpu - self._before.get(pid, (name, 0, 0.0))[2]
            if spent <= 0:
                continue
            if pid == os.getpid():
                used["producer"] += spent
            elif pid in worker:
                used["worker"] += spent
            elif self.broker and name.startswith(self.broker):
                used["broker"] += spent
            else:
                used["other"] += spent
        self.used = used

    def per_task(self, tasks: int) -> dict[str, float]:
        """Milliseconds of CPU per task, by part (empty where /proc is missing)."""
        return {part: 1000 * seconds / tasks for part, seconds in self.used.items()}
