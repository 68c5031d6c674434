"""One benchmark run: start the stack, run every stage, collect the figures. Used by
`python -m tests.bench` (`make bench`) and, at a tiny scale, by the smoke test."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from tests.bench import stages
from tests.bench.procstat import peak_rss
from tests.bench.report import verdicts
from tests.bench.stack import CORES, PRODUCTION_LIKE, BenchStack

_PACKAGES = ("django", "djangorestframework", "gunicorn", "celery", "kombu", "psycopg", "redis")


@dataclass
class BenchConfig:
    duration: float = 10.0  # seconds of wrk per web stage
    threads: int = 2
    connections: int = 16
    workflows: int = 3000
    scaling_workflows: int = 1000  # per run of the scaling table; 0 leaves it out
    e2e_timeout: float = 180.0
    # Customer B's single links idle and under customer A's backlog of POST /link/batch:
    # `fairness_batches` of `fairness_items` (0 batches leaves the stage out).
    fairness_batches: int = 8
    fairness_items: int = 1000
    fairness_idle_links: int = 20
    fairness_timeout: float = 60.0
    sweep_rows: int = 1_000_000
    sweep_stale: int = 1_000
    standin_latency_ms: int = 50
    web_workers: int = 2 * CORES + 1
    celery_workers: int = CORES
    settings: dict[str, str] = field(default_factory=dict)  # NAME=VALUE overrides
    keep_logs: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep_logs"] = str(self.keep_logs) if self.keep_logs else None
        return data


def _echo(message: str) -> None:
    print(message, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    memory = 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) / 1024 / 1024
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def versions(stack: BenchStack) -> dict[str, str]:
    found = {name: metadata.version(name) for name in _PACKAGES}
    with stack.db() as conn:
        row = conn.execute("SHOW server_version").fetchone()
        found["postgresql"] = str(row[0]) if row else "?"
    info: dict[str, Any] = redis.Redis.from_url(stack.redis_url).info("server")
    found["redis-server"] = str(info["redis_version"])
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    found["wrk"] = (wrk.stdout or wrk.stderr).splitlines()[0].split(" Copyright")[0]
    return found


def _peaks(figures: dict[str, Any]) -> dict[str, Any]:
    """The highest peak RSS any web worker, and any Celery worker, reached in any stage."""
    web = [mib for stage in figures.values() for mib in stage.get("web_peak_rss_mib", [])]
    celery = [
        mib for stage in figures.values() for mib in stage.get("celery_worker_peak_rss_mib", [])
    ]
    return {
        "web_worker_peak_mib": max(web) if web else None,
        "celery_worker_peak_mib": max(celery) if celery else None,
    }


def run_bench(config: BenchConfig, *, echo: Callable[[str], None] = _echo) -> dict[str, Any]:
    """Every stage, in an order that keeps them apart: end to end first, then fairness and the
    scaling runs (the only ones with the Celery workers up, so that their CPU never shares a web
    stage), then A, the ack path and the status read back to back (a noisy neighbour moves all
    three together), the sweep last (it replaces the workflow table). Figures in `stages`; a
    stage that could not run in `errors`."""
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config.as_dict(),
        "settings": {
            **{k: v for k, v in PRODUCTION_LIKE.items() if "KEY" not in k},
            **config.settings,
        },
        "stages": {},
        "rss": {},
        "errors": {},
    }
    load = stages.Load(config.duration, config.threads, config.connections)

    def stage(name: str, run: Callable[[], dict[str, Any] | None]) -> None:
        echo(f"== {name} ...")
        started = time.monotonic()
        try:
            figures = run()
        except Exception as exc:
            results["errors"][name] = "".join(traceback.format_exception(exc))[-4000:]
            echo(f"   FAILED: {type(exc).__name__}: {exc}")
            return
        if figures is not None:
            results["stages"][name] = figures
        echo(f"   done in {time.monotonic() - started:.1f} s")

    if shutil.which("wrk") is None:
        results["errors"]["stack"] = "wrk is not installed: `make wrk` (apt-get install wrk)"
        results["targets"] = [verdict.as_dict() for verdict in verdicts(results)]
        return results
    try:
        echo("== starting the stack (fresh database, redis, stand-in, receiver, gunicorn) ...")
        with BenchStack(
            web_workers=config.web_workers,
            celery_workers=config.celery_workers,
            standin_latency_ms=config.standin_latency_ms,
            settings=config.settings,
            keep_logs=config.keep_logs,
        ) as stack:
            results["versions"] = versions(stack)
            stage(
                "end_to_end",
                lambda: stages.end_to_end(
                    stack, load, workflows=config.workflows, timeout=config.e2e_timeout
                ),
            )
            if config.fairness_batches:
                stage(
                    "fairness",
                    lambda: stages.fairness(
                        stack,
                        idle_links=config.fairness_idle_links,
                        batches=config.fairness_batches,
                        items=config.fairness_items,
                        timeout=config.fairness_timeout,
                    ),
                )
            if config.scaling_workflows:
                # The setting's default, as the workers read it (the harness has no settings).
                default_batch = int(
                    stack.python(
                        "import django; django.setup(); from django.conf import settings;"
                        " print(settings.WORKER_BATCH_SIZE)"
                    )
                )
                stage(
                    "scaling",
                    lambda: stages.scaling(
                        stack,
                        load,
                        workflows=config.scaling_workflows,
                        timeout=config.e2e_timeout,
                        default_batch=default_batch,
                    ),
                )
            # The web stages' messages are published by a dispatcher of their own (the workers,
            # which each run one, are down): its CPU is the ack stage's, in its own column.
            stack.start_dispatcher()
            stage("warm_up", lambda: stages.warm_up(stack, load))
            stage("yardstick", lambda: stages.yardstick(stack, load))
            stage("ack", lambda: stages.ack(stack, load))
            stage("status", lambda: stages.status(stack, load))
            stage("batch", lambda: stages.batch(stack))
            results["rss"]["web_master_mib"] = next(iter(peak_rss([stack.web_group()])), None)
            stack.stop_web()
            stack.stop_dispatcher()
            stage(
                "sweep",
                lambda: stages.sweep(stack, rows=config.sweep_rows, stale=config.sweep_stale),
            )
    except Exception as exc:
        results["errors"]["stack"] = "".join(traceback.format_exception(exc))[-4000:]
        echo(f"   the stack failed: {type(exc).__name__}: {exc}")
    results["rss"].update(_peaks(results["stages"]))
    results["targets"] = [verdict.as_dict() for verdict in verdicts(results)]
    return results
