"""CPU time and peak memory of processes, read from /proc (Linux): what the benchmark reports
next to each throughput figure, so that a ratio can be told apart from a busy machine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    pgrp: int
    # utime + stime of the process and of its children it has reaped (cutime + cstime): a
    # PostgreSQL backend that exits within a stage (a connection per task) still counts, in
    # its postmaster's figure.
    cpu_seconds: float


def stat(pid: int) -> ProcStat | None:
    """One process's /proc/<pid>/stat, or None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 of proc(5): state, ppid, pgrp, ... utime (14), stime (15),
    # cutime (16), cstime (17).
    ticks = sum(int(value) for value in fields[11:15])
    return ProcStat(pid, comm, int(fields[1]), int(fields[2]), ticks / _TICKS)


def all_stats() -> list[ProcStat]:
    stats = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            found = stat(int(entry.name))
            if found is not None:
                stats.append(found)
    return stats


def group_pids(pgrp: int) -> list[int]:
    """The processes of a process group (a gunicorn master and its workers, say)."""
    return sorted(s.pid for s in all_stats() if s.pgrp == pgrp)


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the most resident memory the process ever had, in MiB; None if it is gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# A CPU source: a name and a predicate on a process.
Selector = Callable[[ProcStat], bool]


def in_group(pgrp: int) -> Selector:
    return lambda s: s.pgrp == pgrp


def named(comm: str) -> Selector:
    return lambda s: s.comm == comm


class CpuMeter:
    """CPU seconds used by named sets of processes between `start()` and `stop()`.

    Sums each set's CPU (its own and its reaped children's) over the processes alive at each
    reading. A process that exits in between and is reaped by a parent in the same set still
    counts; one whose parent is elsewhere loses its share, which is why the stack's processes
    stay up through a stage.
    """

    def __init__(self, sources: dict[str, Selector]) -> None:
        self.sources = sources
        self._before: dict[str, dict[int, float]] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        stats = all_stats()
        return {
            name: {s.pid: s.cpu_seconds for s in stats if select(s)}
            for name, select in self.sources.items()
        }

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        # Totals, not per process: a child's time moves into its parent's when it is reaped.
        return {
            name: round(sum(after[name].values()) - sum(self._before.get(name, {}).values()), 3)
            for name in after
        }


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _machine_ticks() -> list[int]:
    first = (_PROC / "stat").read_text().splitlines()[0].split()
    return [int(v) for v in first[1 : 1 + len(_STAT_FIELDS)]]


class MachineMeter:
    """The whole machine's CPU seconds (all cores, /proc/stat) between `start()` and `stop()`:
    what the per-process figures cannot see (the kernel's network work in softirq, time stolen
    by the hypervisor, anything else running on the box) shows up here."""

    def __init__(self) -> None:
        self._before: list[int] = []

    def start(self) -> None:
        self._before = _machine_ticks()

    def stop(self) -> dict[str, float]:
        delta = [
            after - before for after, before in zip(_machine_ticks(), self._before, strict=True)
        ]
        used = dict(zip(_STAT_FIELDS, (ticks / _TICKS for ticks in delta), strict=True))
        busy = sum(v for k, v in used.items() if k not in ("idle", "iowait"))
        return {
            "busy": round(busy, 2),
            "idle": round(used["idle"] + used["iowait"], 2),
            "softirq": round(used["softirq"], 2),
            "steal": round(used["steal"], 2),
        }


def peak_rss(pids: Iterable[int]) -> list[float]:
    return [round(rss, 1) for pid in pids if (rss := peak_rss_mib(pid)) is not None]


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Start each process's VmHWM again from its current RSS (proc(5), clear_refs "5"), so that
    a stage's peak is its own; False if the kernel refused (the peak then covers the run)."""
    done = True
    for pid in pids:
        try:
            (_PROC / str(pid) / "clear_refs").write_text("5")
        except OSError:
            done = False
    return done
