"""`make bench` at a tiny scale, in `make test`: the harness starts the real stack, every stage
runs, and its figures hold together. (The figures themselves mean nothing at this scale.)"""

import json
import os
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from tests.bench.procstat import all_stats
from tests.bench.report import render, verdicts
from tests.bench.run import BenchConfig, run_bench
from tests.bench.stack import MACHINE_DATABASE_URL, with_option
from tests.bench.stages import percentile
from tests.bench.wrk import run_wrk
from tests.processes import admin_params, serving

WEB_STAGES = ("yardstick", "ack", "status")


def test_every_stage_runs_and_reports(tmp_path: Any) -> None:
    results = run_bench(
        BenchConfig(
            duration=1,
            workflows=50,
            scaling_workflows=20,
            e2e_timeout=60,
            fairness_batches=1,
            fairness_items=200,
            fairness_idle_links=3,
            fairness_timeout=30,
            sweep_rows=10_000,
            sweep_stale=10,
            keep_logs=tmp_path / "logs",
        ),
        echo=lambda message: None,
    )
    assert results["errors"] == {}, "\n\n".join(results["errors"].values())
    # Nothing left behind: every process stopped, the database dropped.
    assert [p.comm for p in all_stats() if p.ppid == os.getpid()] == []
    server = os.environ.get("DATABASE_URL", MACHINE_DATABASE_URL)
    with psycopg.connect(autocommit=True, **admin_params(server)) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s", [f"merchant_bench_{os.getpid()}"]
        ).fetchall()
    assert left == []
    stages = results["stages"]

    for name in WEB_STAGES:
        stage = stages[name]
        assert stage["requests"] > 0, name
        # Every answer 2xx: a valid token, a new key and patient per POST, and no rate limit
        # (hundreds of requests a second from one customer would meet the default ones).
        assert stage["non2xx"] == 0, (name, stage["statuses"])
        assert not any(stage["socket_errors"].values()), (name, stage["socket_errors"])
        assert 0 < stage["latency_ms"]["p50"] <= stage["latency_ms"]["p99"], name
        assert stage["cpu_seconds"]["web"] > 0 and stage["cpu_seconds"]["wrk"] > 0, name
        assert stage["web_peak_rss_mib"], name
    assert stages["status"]["distinct_ids"] > 0

    e2e = stages["end_to_end"]
    assert e2e["posted"] >= 50
    assert e2e["completed"] == e2e["posted"] and not e2e["timed_out"], e2e["by_status"]
    assert e2e["webhooks_delivered"] == e2e["completed"]
    assert e2e["workflows_per_second"] > 0
    assert 0 < e2e["to_completed_s"]["p50"] <= e2e["to_completed_s"]["p99"]
    assert e2e["cpu_seconds"]["workers"] > 0 and e2e["celery_worker_peak_rss_mib"]

    # B's links idle and under A's backlog (one batch of 200 here), every one of them completed.
    fair = stages["fairness"]
    idle, under, backlog = fair["b_idle"], fair["b_under_backlog"], fair["a_backlog"]
    assert idle["completed"] == idle["links"] == 3, idle["by_status"]
    assert under["completed"] == under["links"] >= 1, under["by_status"]
    for phase in (idle, under):
        assert 0 < phase["p50"] <= phase["p99"] <= phase["max"]
        assert 0 < phase["to_claimed_s"]["p50"] <= phase["p50"]
    assert backlog["items"] == backlog["posted"] == backlog["completed"] == 200
    assert backlog["drained"] and backlog["drain_s"] > 0 and len(backlog["ack_s"]) == 1
    assert fair["ratio"]["p50"] > 0 and fair["abandoned"] == 0

    # The scaling runs: each batch size and worker count its own run, all of it completed.
    scaling = stages["scaling"]
    assert scaling["default_batch"] == 50
    assert sorted((r["batch"], r["celery_workers"]) for r in scaling["runs"].values()) == [
        (1, 2),
        (10, 2),
        (50, 1),
    ]
    for run in scaling["runs"].values():
        assert run["completed"] == run["posted"] >= 20 and not run["timed_out"], run["by_status"]
        assert run["cpu_seconds"]["workers"] > 0

    batch = stages["batch"]
    assert batch["items"] == 1000 and len(batch["seconds"]) == batch["batches"] == 5
    assert 0 < batch["median_s"] <= batch["max_s"]

    sweep = stages["sweep"]
    assert sweep["requeued"] == sweep["stale_rows_requeued_in_db"] == 10
    assert sweep["rows_requeued_in_db"] == 10 and sweep["failed"] == 0
    assert sweep["seconds"] > 0

    found = verdicts(results)
    assert [v.name for v in found] == [
        "ack",
        "status",
        "end to end",
        "CPU total",
        "CPU workers",
        "CPU postgres",
        "sweep",
        "batch ack",
        "web RSS",
    ]
    assert all(v.passed is not None for v in found), found
    table = render(results)
    assert "A: yardstick" in table and "POST /link" in table and "GET /link/status" in table
    assert "scaling (end to end" in table and "POST /link/batch of 1,000 items" in table
    assert "fairness: customer B" in table and "B under A's backlog" in table
    json.dumps(results)  # what `--json` writes


class _Conflict(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(409)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def conflicting_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Conflict)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_wrk_counts_non_2xx_answers_as_errors(conflicting_server: str) -> None:
    result = run_wrk(conflicting_server, "yardstick.lua", duration=1, threads=1, connections=2)
    assert result.requests > 0
    assert result.non2xx == result.requests == result.statuses["409"]
    assert result.ok == 0 and result.errors >= result.requests


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3


def test_procfile_options_are_replaced_not_duplicated() -> None:
    args = ["gunicorn", "app", "--workers", "3", "--bind=0.0.0.0:1"]
    args = with_option(with_option(args, "--workers", "5"), "--bind", "127.0.0.1:2")
    assert args == ["gunicorn", "app", "--workers", "5", "--bind", "127.0.0.1:2"]
