"""wrk, the load generator: runs one of the Lua scripts in lua/ and reads the JSON line its
done() prints (requests, errors by kind, non-2xx answers by status, latency percentiles)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LUA_DIR = Path(__file__).resolve().parent / "lua"
_MARK = "BENCH_JSON "


class WrkFailed(RuntimeError):
    pass


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    non2xx: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_seconds: float  # wrk's own utime + stime: the generator's share of the machine
    output: str = field(repr=False, default="")

    @property
    def ok(self) -> int:
        """Answers that were 2xx (wrk counts a request only once it has its answer)."""
        return self.requests - self.non2xx

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        """Everything that is not a 2xx answer: non-2xx statuses and socket errors."""
        socket = sum(v for k, v in self.socket_errors.items() if k != "status")
        return self.non2xx + socket

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "duration_s": round(self.duration_s, 3),
            "ok_per_second": round(self.ok_per_second, 1),
            "non2xx": self.non2xx,
            "statuses": self.statuses,
            "socket_errors": self.socket_errors,
            "latency_ms": self.latency_ms,
            "generator_cpu_seconds": round(self.cpu_seconds, 3),
        }


def wrk_command(
    url: str, script: str, *, duration: float, threads: int, connections: int
) -> list[str]:
    return [
        "wrk",
        "--threads",
        str(threads),
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(duration))}s",
        # Well above any answer we expect: a slow answer must count in the latency
        # percentiles, not vanish as a wrk timeout (the default is 2 s).
        "--timeout",
        "10s",
        "--latency",
        "--script",
        str(LUA_DIR / script),
        url,
    ]


def run_wrk(
    url: str,
    script: str,
    *,
    duration: float,
    threads: int,
    connections: int,
    env: dict[str, str] | None = None,
    poll: Callable[[subprocess.Popen[str]], None] | None = None,
) -> WrkResult:
    """Run wrk to the end; `poll(proc)` is called every 0.1 s meanwhile (it may SIGINT wrk,
    which then stops at once and still reports). Bounded: killed 30 s after its duration."""
    args = wrk_command(url, script, duration=duration, threads=threads, connections=connections)
    full_env = {**os.environ, "BENCH_LUA_DIR": str(LUA_DIR), **(env or {})}
    # wrk's CPU time comes from the kernel's account of reaped children: taken around this one
    # child, with no other child of this process reaped in between.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + duration + 30
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise WrkFailed(f"wrk still running {duration + 30:.0f}s after its start")
            if poll is not None:
                poll(proc)
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise WrkFailed(f"wrk exited {proc.returncode}:\n{output[-2000:]}")
    return parse_output(output, cpu)


def interrupt(proc: subprocess.Popen[str]) -> None:
    """Stop wrk early: on SIGINT it stops its threads and still runs done()."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def parse_output(output: str, cpu_seconds: float) -> WrkResult:
    lines = [line for line in output.splitlines() if line.startswith(_MARK)]
    if not lines:
        raise WrkFailed(f"no result line from the script's done():\n{output[-2000:]}")
    data = json.loads(lines[-1][len(_MARK) :])
    latency = {k: round(v / 1000, 2) for k, v in data["latency_us"].items()}
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        non2xx=int(data["non2xx"]),
        statuses={str(k): int(v) for k, v in data["statuses"].items()},
        socket_errors={k: int(v) for k, v in data["errors"].items()},
        latency_ms=latency,
        cpu_seconds=cpu_seconds,
        output=output,
    )
