"""`python -m tests.bench [--duration S] [--workflows N] [--json FILE] ...` (`make bench`).

Starts the stack with production settings on a fresh database, measures A (the yardstick),
POST /link, GET /link/status, N workflows end to end, one customer's latency idle and under
another's backlog (fairness) and one reconciliation sweep, prints the table and the targets,
writes the figures as JSON. Exit status 1 only when a stage could not
run (the targets are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.bench.report import render
from tests.bench.run import BenchConfig, run_bench


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> int:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--duration", type=float, default=defaults.duration, help="seconds per web stage"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads, help="wrk threads")
    parser.add_argument(
        "--connections", type=int, default=defaults.connections, help="wrk connections"
    )
    parser.add_argument(
        "--workflows", type=int, default=defaults.workflows, help="workflows end to end"
    )
    parser.add_argument(
        "--scaling-workflows",
        type=int,
        default=defaults.scaling_workflows,
        help="workflows per run of the scaling table (0: no table)",
    )
    parser.add_argument(
        "--e2e-timeout",
        type=float,
        default=defaults.e2e_timeout,
        help="seconds the end-to-end stage may take",
    )
    parser.add_argument(
        "--fairness-batches",
        type=int,
        default=defaults.fairness_batches,
        help="customer A's backlog in the fairness stage: POST /link/batch requests (0: no stage)",
    )
    parser.add_argument(
        "--fairness-items",
        type=int,
        default=defaults.fairness_items,
        help="items per batch of A's backlog",
    )
    parser.add_argument(
        "--fairness-idle-links",
        type=int,
        default=defaults.fairness_idle_links,
        help="customer B's links measured with nothing else queued",
    )
    parser.add_argument(
        "--fairness-timeout",
        type=float,
        default=defaults.fairness_timeout,
        help="seconds A's backlog may take to drain",
    )
    parser.add_argument("--sweep-rows", type=int, default=defaults.sweep_rows)
    parser.add_argument("--sweep-stale", type=int, default=defaults.sweep_stale)
    parser.add_argument("--standin-latency-ms", type=int, default=defaults.standin_latency_ms)
    parser.add_argument("--web-workers", type=int, default=defaults.web_workers)
    parser.add_argument(
        "--celery-workers",
        type=int,
        default=defaults.celery_workers,
        help="worker processes, each started as the Procfile's `worker` line",
    )
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every process of the stack (repeatable)",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()

    config = BenchConfig(
        duration=args.duration,
        threads=args.threads,
        connections=args.connections,
        workflows=args.workflows,
        scaling_workflows=args.scaling_workflows,
        e2e_timeout=args.e2e_timeout,
        fairness_batches=args.fairness_batches,
        fairness_items=args.fairness_items,
        fairness_idle_links=args.fairness_idle_links,
        fairness_timeout=args.fairness_timeout,
        sweep_rows=args.sweep_rows,
        sweep_stale=args.sweep_stale,
        standin_latency_ms=args.standin_latency_ms,
        web_workers=args.web_workers,
        celery_workers=args.celery_workers,
        settings=dict(args.set),
        keep_logs=args.keep_logs,
    )
    results = run_bench(config)
    print("\n" + render(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
