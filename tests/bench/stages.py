"""The stages of `make bench`. Each takes the running stack and returns its figures as a dict
(what the table prints and the JSON file holds); a stage that cannot run raises."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import requests

from tests.bench.procstat import (
    CpuMeter,
    MachineMeter,
    Selector,
    group_pids,
    in_group,
    named,
    peak_rss,
    reset_peak_rss,
)
from tests.bench.stack import YARDSTICK_PATH, BenchStack, Customer
from tests.bench.wrk import WrkResult, interrupt, run_wrk
from tests.processes import Process

# Celery's default queue, where the ack stage's messages wait (no consumer runs meanwhile).
_QUEUE = "celery"


class StageFailed(RuntimeError):
    """The stage ran but its result cannot be used (e.g. the sweep did not do the work)."""


@dataclass(frozen=True)
class Load:
    duration: float
    threads: int
    connections: int


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _server_sources(stack: BenchStack) -> dict[str, Selector]:
    sources = {
        "web": in_group(stack.web_group()),
        "postgres": named("postgres"),
        "redis": in_group(stack.redis_pid()),
    }
    if "dispatcher" in stack.processes:
        # The web stages' own dispatcher (in the end-to-end stage, the workers' is theirs).
        sources["dispatcher"] = in_group(stack.processes["dispatcher"].pid)
    return sources


# --- A, the ack path, the status read: wrk against gunicorn ------------------------------------


def web_stage(
    stack: BenchStack,
    load: Load,
    *,
    script: str,
    path: str,
    env: dict[str, str] | None = None,
    settle: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """wrk for `load.duration` seconds; the answers, latencies, everyone's CPU meanwhile and the
    web workers' peak memory. `settle()` runs after wrk and before the CPU is read: work the
    requests left behind (publishing) is charged to them; its figures join the stage's."""
    web_workers = stack.web_worker_pids()
    own_peak = reset_peak_rss(web_workers)
    meter, machine = CpuMeter(_server_sources(stack)), MachineMeter()
    meter.start()
    machine.start()
    result = run_wrk(
        f"{stack.base_url}{path}",
        script,
        duration=load.duration,
        threads=load.threads,
        connections=load.connections,
        env={"BENCH_TOKEN": stack.token, **(env or {})},
    )
    settled = settle() if settle is not None else {}
    cpu = meter.stop()
    cpu["wrk"] = round(result.cpu_seconds, 3)
    figures = {**_web_figures(result, cpu), **settled}
    figures["machine_cpu_seconds"] = _with_rest(machine.stop(), cpu)
    figures["web_peak_rss_mib"] = peak_rss(web_workers)
    figures["peak_rss_since"] = "stage start" if own_peak else "process start"
    return figures


def _with_rest(machine: dict[str, float], cpu: dict[str, float]) -> dict[str, float]:
    """The machine's busy time that none of the measured processes used: the kernel's network
    work, a neighbour on a shared machine, the harness itself."""
    return {**machine, "rest": round(machine["busy"] - sum(cpu.values()), 2)}


def _web_figures(result: WrkResult, cpu: dict[str, float]) -> dict[str, Any]:
    figures = result.as_dict()
    figures["cpu_seconds"] = cpu
    busy = cpu["web"] + cpu["wrk"]
    figures["cpu_share"] = {
        "server": round(cpu["web"] / busy, 3) if busy else None,
        "generator": round(cpu["wrk"] / busy, 3) if busy else None,
    }
    figures["server_cpu_ms_per_request"] = (
        round(cpu["web"] * 1000 / result.requests, 3) if result.requests else None
    )
    return figures


def yardstick(stack: BenchStack, load: Load) -> dict[str, Any]:
    return web_stage(stack, load, script="yardstick.lua", path=f"/{YARDSTICK_PATH}")


def ack(stack: BenchStack, load: Load) -> dict[str, Any]:
    client = redis.Redis.from_url(stack.redis_url)
    before = int(client.llen(_QUEUE))
    return web_stage(
        stack,
        load,
        script="ack.lua",
        path="/link",
        env={"BENCH_PREFIX": secrets.token_hex(4)},
        settle=lambda: {"messages_published": _settle_queue(client) - before},
    )


def _patient(patient_id: str) -> dict[str, Any]:
    """ack.lua's patient (README.md's example): the stand-in finds exactly one certain match."""
    return {
        "id": patient_id,
        "full_name": "Jane Q Doe",
        "dob": "1980-04-02",
        "contact": {
            "address": "1 Main St, Springfield",
            "phone": "+1-555-0100",
            "email": "jane@example.org",
        },
        "insurance": {"payer": "Acme Health", "member_id": "A123"},
    }


def _post_batch(
    session: requests.Session, stack: BenchStack, token: str, prefix: str, number: int, items: int
) -> tuple[float, int]:
    """One POST /link/batch of `items` new patients (ids `prefix-number-...`): the seconds from
    sending it to its 202, and the body's size. Anything but all of it accepted raises."""
    body = {
        "requests": [
            {
                "idempotency-key": f"batch-{prefix}-{number}-{n}",
                "patient": _patient(f"{prefix}-{number:04x}-4000-8000-{n:012x}"),
            }
            for n in range(items)
        ]
    }
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    answer = session.post(
        f"{stack.base_url}/link/batch",
        data=payload,
        headers={
            "Content-Type": "application/json",
            "customer-token": token,
            "Idempotency-Key": f"batch-{prefix}-{number}",
        },
        timeout=30,
    )
    seconds = time.perf_counter() - started
    if answer.status_code != 202 or answer.json()["accepted"] != items:
        raise StageFailed(f"batch {number}: {answer.status_code} {answer.text[:300]}")
    return seconds, len(payload)


def batch(stack: BenchStack, *, items: int = 1000, batches: int = 5) -> dict[str, Any]:
    """POST /link/batch, `batches` times `items` new patients (ack.lua's body), one after the
    other over one kept connection: the time from sending each to its 202 (issue 19: a
    1,000-item batch acknowledged in <= 1 s). The dispatcher publishes their messages."""
    prefix = secrets.token_hex(4)
    seconds: list[float] = []
    size = 0
    with requests.Session() as session:
        for number in range(batches):
            took, size = _post_batch(session, stack, stack.token, prefix, number, items)
            seconds.append(took)
    return {
        "items": items,
        "batches": batches,
        "body_bytes": size,
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(sorted(seconds)[len(seconds) // 2], 3),
        "max_s": round(max(seconds), 3),
    }


def _settle_queue(client: redis.Redis, *, timeout: float = 15) -> int:
    """Wait until the ack stage's messages are all published (the dispatcher publishes them
    after each commit; no consumer runs during the web stages); the number waiting in Celery's
    default queue then."""
    deadline = time.monotonic() + timeout
    last, steady_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        length = int(client.llen(_QUEUE))
        if length != last:
            last, steady_since = length, time.monotonic()
        elif time.monotonic() - steady_since > 0.5:
            break
        time.sleep(0.1)
    return last


def status(stack: BenchStack, load: Load, *, sample: int = 2000) -> dict[str, Any]:
    """GET /link/status over ids of workflows created by the earlier stages (the stack's own
    customer's: the fairness stage's customers' would be 404s to its token)."""
    with stack.db() as conn:
        ids = [
            str(row[0])
            for row in conn.execute(
                "SELECT id FROM workflows_workflow WHERE customer_id = %s::uuid"
                " ORDER BY random() LIMIT %s",
                [stack.customer_id, sample],
            )
        ]
    if not ids:
        raise StageFailed("no workflow to read the status of: the earlier stages made none")
    ids_file = stack.workdir / "status-ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    figures = web_stage(
        stack,
        load,
        script="status.lua",
        path="/link/status",
        env={"BENCH_IDS_FILE": str(ids_file)},
    )
    figures["distinct_ids"] = len(ids)
    return figures


def warm_up(stack: BenchStack, load: Load) -> None:
    """Every gunicorn worker imports its views and opens its database connection on its first
    requests: not something the first measured second should pay."""
    short = Load(1, load.threads, load.connections)
    web_stage(stack, short, script="yardstick.lua", path=f"/{YARDSTICK_PATH}")
    ids_file = stack.workdir / "warm-up-ids.txt"
    ids_file.write_text("00000000-0000-4000-8000-000000000000\n")  # a 404 behind the token
    web_stage(
        stack,
        short,
        script="status.lua",
        path="/link/status",
        env={"BENCH_IDS_FILE": str(ids_file)},
    )


# --- end to end ----------------------------------------------------------------------------------

# A run's workflows are those whose patient ids start with its prefix (tests/bench/lua/ack.lua).
_E2E_ROWS = """
SELECT w.status,
       extract(epoch FROM w.created_at)::float8,
       (SELECT extract(epoch FROM min(t.at))::float8 FROM workflows_workflowtransition t
         WHERE t.workflow_id = w.id AND t.target = 'COMPLETED'),
       (SELECT extract(epoch FROM min(d.delivered_at))::float8 FROM workflows_webhookdelivery d
         WHERE d.workflow_id = w.id)
  FROM workflows_workflow w
 WHERE w.patient_id::text LIKE %s
"""
_E2E_PROGRESS = """
SELECT count(*), count(*) FILTER (WHERE status IN ('COMPLETED', 'FAILED'))
  FROM workflows_workflow
 WHERE patient_id::text LIKE %s
"""
_E2E_WEBHOOKS_DONE = """
SELECT count(*)
  FROM workflows_webhookdelivery d JOIN workflows_workflow w ON w.id = d.workflow_id
 WHERE w.patient_id::text LIKE %s AND d.status <> 'PENDING'
"""


def end_to_end(
    stack: BenchStack,
    load: Load,
    *,
    workflows: int,
    timeout: float,
    celery_workers: int | None = None,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`workflows` link requests posted as fast as wrk can (the ack script, each thread stopped
    after its share), worked by the Celery workers against the stand-in, webhooks to the
    receiver. The clock runs from the first 202 to the last COMPLETED, both read from the
    database (the workflow's created_at, its COMPLETED transition). The Celery workers and beat
    run for this stage only, and are stopped whatever happens."""
    try:
        workers = stack.start_consumers(celery_workers=celery_workers, settings=settings)
        return _end_to_end(stack, workers, load, workflows=workflows, timeout=timeout)
    finally:
        stack.stop_consumers()


# Batch sizes and worker processes of the scaling table; `None` is the setting's default,
# whose run with the stack's worker count is the end-to-end stage itself.
SCALING = ((1, None), (10, None), (None, 1))


def scaling(
    stack: BenchStack, load: Load, *, workflows: int, timeout: float, default_batch: int
) -> dict[str, Any]:
    """End to end again with other batch sizes (WORKER_BATCH_SIZE) and worker process counts,
    `workflows` each: what batching buys, and what a second worker process adds."""
    runs: dict[str, Any] = {}
    for batch, workers in SCALING:
        size = batch or default_batch
        count = workers or stack.celery_workers
        figures = end_to_end(
            stack,
            load,
            workflows=workflows,
            timeout=timeout,
            celery_workers=count,
            settings={"WORKER_BATCH_SIZE": str(size)},
        )
        runs[f"batch {size}, {count} workers"] = {"batch": size, **figures}
    return {"default_batch": default_batch, "runs": runs}


def _end_to_end(
    stack: BenchStack, workers: list[Process], load: Load, *, workflows: int, timeout: float
) -> dict[str, Any]:
    prefix = secrets.token_hex(4)
    like = f"{prefix}-%"
    stop_file = stack.workdir / f"e2e-{prefix}.stopped"
    groups = {w.pid for w in workers}
    sources = {
        **_server_sources(stack),
        "workers": (lambda s: s.pgrp in groups),
        "beat": in_group(stack.processes["beat"].pid),
        "standin": in_group(stack.processes["standin"].pid),
        "receiver": in_group(stack.processes["receiver"].pid),
    }
    meter, machine = CpuMeter(sources), MachineMeter()
    web_workers = stack.web_worker_pids()
    worker_pids = [pid for w in workers for pid in group_pids(w.pid)]
    own_peak = reset_peak_rss([*web_workers, *worker_pids])
    with stack.db() as conn:

        def progress() -> tuple[int, int]:
            row = conn.execute(_E2E_PROGRESS, [like]).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        def webhooks_done() -> int:
            row = conn.execute(_E2E_WEBHOOKS_DONE, [like]).fetchone()
            return int(row[0]) if row else 0

        last_count = 0.0

        def poll(proc: subprocess.Popen[str]) -> None:
            # Each wrk thread stops itself after its share, but wrk sleeps out its whole
            # duration unless interrupted. Also stop it once the database has them all (a
            # thread whose connections failed never reaches its share); that query only
            # twice a second, its CPU is in the figures.
            nonlocal last_count
            stopped = stop_file.read_text().count("stopped") if stop_file.exists() else 0
            if stopped >= load.threads:
                interrupt(proc)
            elif time.monotonic() - last_count > 0.5:
                last_count = time.monotonic()
                if progress()[0] >= workflows:
                    interrupt(proc)

        meter.start()
        machine.start()
        started = time.monotonic()
        posted = run_wrk(
            f"{stack.base_url}/link",
            "ack.lua",
            duration=timeout,
            threads=load.threads,
            connections=load.connections,
            env={
                "BENCH_TOKEN": stack.token,
                "BENCH_PREFIX": prefix,
                "BENCH_QUOTA": str(math.ceil(workflows / load.threads)),
                "BENCH_STOP_FILE": str(stop_file),
            },
            poll=poll,
        )
        deadline = started + timeout
        total, terminal = progress()
        while (total == 0 or terminal < total) and time.monotonic() < deadline:
            time.sleep(0.25)
            total, terminal = progress()
        cpu = meter.stop()
        machine_cpu = machine.stop()
        cpu["wrk"] = round(posted.cpu_seconds, 3)
        timed_out = total == 0 or terminal < total
        # The last webhooks are still on their way: a few seconds more for them (not timed).
        webhook_deadline = time.monotonic() + 15
        while webhooks_done() < terminal and time.monotonic() < webhook_deadline:
            time.sleep(0.25)
        rows = conn.execute(_E2E_ROWS, [like]).fetchall()
    heartbeats = heartbeat_cost(stack)
    rss = {
        "web_peak_rss_mib": peak_rss(web_workers),
        "celery_worker_peak_rss_mib": peak_rss(worker_pids),
        "peak_rss_since": "stage start" if own_peak else "process start",
    }

    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row[0]] = by_status.get(row[0], 0) + 1
    completed = [(row[1], row[2]) for row in rows if row[2] is not None]
    delivered = [row[3] - row[1] for row in rows if row[3] is not None]
    if not completed:
        raise StageFailed(f"no workflow completed (by status: {by_status})")
    first_created = min(row[1] for row in rows)
    last_completed = max(done for _, done in completed)
    span = max(last_completed - first_created, 1e-6)
    to_completed = [done - created for created, done in completed]
    return {
        "asked": workflows,
        "posted": len(rows),
        "completed": len(completed),
        "by_status": by_status,
        "timed_out": timed_out,
        "seconds": round(span, 3),
        "workflows_per_second": round(len(completed) / span, 1),
        "to_completed_s": {
            "p50": round(percentile(to_completed, 50), 3),
            "p99": round(percentile(to_completed, 99), 3),
            "max": round(max(to_completed), 3),
        },
        "webhooks_delivered": len(delivered),
        "to_webhook_s": {
            "p50": round(percentile(delivered, 50), 3) if delivered else None,
            "p99": round(percentile(delivered, 99), 3) if delivered else None,
        },
        "post": posted.as_dict(),
        "cpu_seconds": cpu,
        "machine_cpu_seconds": _with_rest(machine_cpu, cpu),
        "cpu_ms_per_workflow": {
            name: round(seconds * 1000 / len(completed), 2) for name, seconds in cpu.items()
        },
        "celery_workers": len(workers),
        "heartbeats": {
            **heartbeats,
            # Upper bound: the threads' CPU plus the statements' whole wall time (PostgreSQL's
            # share of it included, and the waits).
            "ms_per_workflow": round(
                (heartbeats["cpu_seconds"] + heartbeats["statement_seconds"])
                * 1000
                / len(completed),
                5,
            ),
        },
        **rss,
    }


_HEARTBEAT_METRICS = {
    "merchant_claim_heartbeats_total": "statements",
    "merchant_claim_heartbeat_renewed_total": "renewed",
    "merchant_claim_heartbeat_cpu_seconds_total": "cpu_seconds",
    "merchant_claim_heartbeat_seconds_total": "statement_seconds",
}


def heartbeat_cost(stack: BenchStack) -> dict[str, float]:
    """The claims' heartbeats over the stage, summed over the workers' own /metrics."""
    totals = dict.fromkeys(_HEARTBEAT_METRICS.values(), 0.0)
    for port in stack.worker_metrics_ports:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in _HEARTBEAT_METRICS:
                totals[_HEARTBEAT_METRICS[name]] += float(value)
    return {name: round(value, 6) for name, value in totals.items()}


# --- fairness: one customer's single links behind another's backlog -----------------------------

# A customer's workflows: the second group of the patient id (the phase of B's links; A's batch
# number), the status, the 202 (created_at), the COMPLETED transition (as end to end) and the
# IN_PROGRESS one (its first claim: the end of its wait for its turn).
_CUSTOMER_ROWS = """
SELECT split_part(w.patient_id::text, '-', 2),
       w.status,
       extract(epoch FROM w.created_at)::float8,
       (SELECT extract(epoch FROM min(t.at))::float8 FROM workflows_workflowtransition t
         WHERE t.workflow_id = w.id AND t.target = 'COMPLETED'),
       (SELECT extract(epoch FROM min(t.at))::float8 FROM workflows_workflowtransition t
         WHERE t.workflow_id = w.id AND t.target = 'IN_PROGRESS')
  FROM workflows_workflow w
 WHERE w.customer_id = %s::uuid
"""
_CUSTOMER_PROGRESS = """
SELECT count(*), count(*) FILTER (WHERE status IN ('COMPLETED', 'FAILED'))
  FROM workflows_workflow
 WHERE customer_id = %s::uuid
"""
# What the stage leaves unended when its time is up (the workers are down by then): failed, so
# that no later stage works it. Not timed, and counted in the figures.
_ABANDON = """
UPDATE workflows_workflow
   SET status = 'FAILED', reason = 'bench: left over by the fairness stage', due_at = NULL,
       published_at = NULL, claim_id = NULL, claimed_until = NULL, updated_at = now()
 WHERE customer_id = ANY(%s::uuid[]) AND status NOT IN ('COMPLETED', 'FAILED')
"""
# B's links by phase (the patient id's second group).
_WARM_UP, _IDLE, _UNDER_BACKLOG = 0, 1, 2
_WARM_UP_LINKS = 3
# How long B's idle links, and the last of B's links after A's backlog, may take to end.
_SETTLE_SECONDS = 30.0


def fairness(
    stack: BenchStack,
    *,
    idle_links: int = 20,
    batches: int = 8,
    items: int = 1000,
    timeout: float = 60.0,
    idle_every: float = 0.2,
    backlog_every: float = 0.5,
) -> dict[str, Any]:
    """Customer B's single links (POST /link), 202 -> COMPLETED, with nothing else queued and
    under customer A's backlog. A and B are onboarded here (weight 1 each), each with a webhook
    receiver of its own. The times come from the workflow rows, as end to end: created_at (the
    202), the IN_PROGRESS transition (its claim) and the COMPLETED one.

    1. The Celery workers and beat start; a few links of B's, not counted, warm them up; then
       B's `idle_links`, one every `idle_every` s, each alone in the schedule.
    2. The workers stop, and A posts `batches` POST /link/batch of `items` new patients, back to
       back: all due at once, a backlog of a known size (posted while the workers run, its
       batches' acks would compete with the drain for the cores, and the backlog's size would
       depend on the machine).
    3. The workers start again. From the first of A's workflows to end, B posts one link every
       `backlog_every` s until all of A's work has ended (at least one): A's drain time, from its
       first claim to its last COMPLETED, and B's latency meanwhile.

    `timeout`: the most A's drain may take; what is left unended then is failed by the harness
    (the figures say how many), so that no later stage works it."""
    tag = secrets.token_hex(3)
    a = stack.onboard(f"Bench backlog A {tag}", receiver=f"receiver-a-{tag}")
    b = stack.onboard(f"Bench single B {tag}", receiver=f"receiver-b-{tag}")
    bound = int(
        stack.python(
            "import django; django.setup(); from workflows.scheduler import in_flight_bound;"
            " print(in_flight_bound())"
        )
    )
    try:
        try:
            figures = _fairness(
                stack,
                a,
                b,
                idle_links=idle_links,
                batches=batches,
                items=items,
                timeout=timeout,
                idle_every=idle_every,
                backlog_every=backlog_every,
            )
        finally:
            stack.stop_consumers()
    finally:
        with stack.db() as conn:
            abandoned = conn.execute(_ABANDON, [[a.customer_id, b.customer_id]]).rowcount
    return {**figures, "in_flight_bound": bound, "abandoned": abandoned}


def _fairness(
    stack: BenchStack,
    a: Customer,
    b: Customer,
    *,
    idle_links: int,
    batches: int,
    items: int,
    timeout: float,
    idle_every: float,
    backlog_every: float,
) -> dict[str, Any]:
    prefix = secrets.token_hex(4)
    with stack.db() as conn, requests.Session() as session:

        def progress(customer: Customer) -> tuple[int, int]:
            """The customer's workflows: all of them, and those ended."""
            row = conn.execute(_CUSTOMER_PROGRESS, [customer.customer_id]).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        def ended(customer: Customer, deadline: float) -> bool:
            """Wait until every workflow of the customer has ended; False at the deadline."""
            while True:
                total, done = progress(customer)
                if total and done >= total:
                    return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

        def post_b(phase: int, number: int) -> None:
            patient = f"{prefix}-{phase:04x}-4000-8000-{number:012x}"
            answer = session.post(
                f"{stack.base_url}/link",
                data=json.dumps({"patient": _patient(patient)}),
                headers={
                    "Content-Type": "application/json",
                    "customer-token": b.token,
                    "Idempotency-Key": f"fair-{prefix}-{phase}-{number}",
                },
                timeout=10,
            )
            if answer.status_code != 202:
                raise StageFailed(f"B's link: {answer.status_code} {answer.text[:300]}")

        # 1. B alone.
        workers = stack.start_consumers()
        for number in range(_WARM_UP_LINKS):
            post_b(_WARM_UP, number)
        if not ended(b, time.monotonic() + _SETTLE_SECONDS):
            raise StageFailed(f"B's warm-up links did not end within {_SETTLE_SECONDS:g} s")
        next_at = time.monotonic()
        for number in range(idle_links):
            _sleep_until(next_at)
            post_b(_IDLE, number)
            next_at = max(next_at + idle_every, time.monotonic())
        if not ended(b, time.monotonic() + _SETTLE_SECONDS):
            raise StageFailed(f"B's idle links did not end within {_SETTLE_SECONDS:g} s")

        # 2. A's backlog, due at once.
        stack.stop_consumers()
        acks: list[float] = []
        for number in range(batches):
            took, _ = _post_batch(session, stack, a.token, prefix, number, items)
            acks.append(took)

        # 3. A's drain, and B's links meanwhile.
        stack.start_consumers()
        deadline = time.monotonic() + timeout
        while progress(a)[1] == 0 and time.monotonic() < deadline:
            # Until A's first workflow ended: the drain is under way, past the workers' first
            # batches (their connections opened), as a backlog meets warm workers.
            time.sleep(0.05)
        a_unended: list[int] = []  # at each of B's links: how much of A's work was left
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            total, done = progress(a)
            if done >= total and a_unended:
                break
            a_unended.append(total - done)
            post_b(_UNDER_BACKLOG, len(a_unended) - 1)
            next_at = max(next_at + backlog_every, time.monotonic())
            _sleep_until(min(next_at, deadline))
        drained = ended(a, deadline)
        ended(b, time.monotonic() + _SETTLE_SECONDS)
        a_rows = conn.execute(_CUSTOMER_ROWS, [a.customer_id]).fetchall()
        b_rows = conn.execute(_CUSTOMER_ROWS, [b.customer_id]).fetchall()

    idle = _latency_spread(b_rows, _IDLE)
    under = _latency_spread(b_rows, _UNDER_BACKLOG)
    if not idle["completed"] or not under["completed"]:
        raise StageFailed(f"B's links did not complete: idle {idle}, under A's backlog {under}")
    a_done = [row for row in a_rows if row[3] is not None]
    if not a_done:
        raise StageFailed(f"none of A's backlog completed (by status: {_by_status(a_rows)})")
    # From A's first claim (the workers were down while A posted) to its last COMPLETED.
    first_claim = min(row[4] for row in a_rows if row[4] is not None)
    span = max(max(row[3] for row in a_done) - first_claim, 1e-6)
    median_unended = sorted(a_unended)[len(a_unended) // 2] if a_unended else 0
    return {
        "measured": "202 -> COMPLETED from the workflow rows (created_at, COMPLETED transition)",
        "celery_workers": len(workers),
        "b_idle": idle,
        "b_under_backlog": {
            **under,
            "a_unended_at_post": {
                "min": min(a_unended, default=0),
                "median": median_unended,
                "max": max(a_unended, default=0),
            },
        },
        "ratio": {
            key: round(under[key] / idle[key], 2) if idle[key] else None
            for key in ("p50", "p99", "max")
        },
        "a_backlog": {
            "batches": batches,
            "items": batches * items,
            "posted": len(a_rows),
            "completed": len(a_done),
            "by_status": _by_status(a_rows),
            "drained": drained,
            "ack_s": [round(took, 3) for took in acks],
            "drain_s": round(span, 3),
            "workflows_per_second": round(len(a_done) / span, 1),
        },
        # What B's links would have waited in first-come-first-served order: the median of A's
        # work left at B's posts, at A's drain rate (an estimate, for scale).
        "fifo_wait_estimate_s": round(median_unended * span / len(a_done), 2),
    }


def _sleep_until(moment: float) -> None:
    wait = moment - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def _by_status(rows: list[Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in rows:
        found[row[1]] = found.get(row[1], 0) + 1
    return found


def _latency_spread(rows: list[Any], phase: int) -> dict[str, Any]:
    """B's links of one phase: how many, how many completed, and 202 -> COMPLETED p50/p99/max."""
    mine = [row for row in rows if int(row[0], 16) == phase]
    seconds = [row[3] - row[2] for row in mine if row[3] is not None]
    # The part of it spent waiting for its turn: 202 -> claimed.
    waits = [row[4] - row[2] for row in mine if row[4] is not None]
    return {
        "links": len(mine),
        "completed": len(seconds),
        "by_status": _by_status(mine),
        "p50": round(percentile(seconds, 50), 3) if seconds else None,
        "p99": round(percentile(seconds, 99), 3) if seconds else None,
        "max": round(max(seconds), 3) if seconds else None,
        "to_claimed_s": {
            "p50": round(percentile(waits, 50), 3) if waits else None,
            "max": round(max(waits), 3) if waits else None,
        },
    }


# --- the reconciliation sweep ------------------------------------------------------------------

_COLUMNS = (
    "id, request_id, customer_id, patient_id, request_type, status, result, reason, attempts, "
    "requeues, claim_id, claimed_until, webhook_url, search_id, created_at, updated_at"
)
# One digit of each row's id (the 10th character) says what the row is, so that the check after
# the sweep can tell the stale rows from the others.
_STALE, _RECENT, _REVIEW, _FAILED, _COMPLETED = "5", "6", "7", "8", "9"
_SWEEP_CHECK = """
SELECT count(*) FILTER (WHERE requeues > 0),
       count(*) FILTER (WHERE requeues > 0 AND substr(id::text, 10, 1) = %(stale)s),
       count(*) FILTER (WHERE status = 'FAILED' AND substr(id::text, 10, 1) <> %(failed)s)
  FROM workflows_workflow
"""
_SWEEP_SNIPPET = """
import json, time
import django
django.setup()
from django.db import connection
from config.celery import app
from workflows.services import workflows_reconcile

# Warm, as in beat's long-running worker: the database connection and the broker connection
# the re-queues are published on. Only the sweep itself is timed.
connection.ensure_connection()
with app.producer_or_acquire() as producer:
    producer.connection.ensure_connection(max_retries=1)
started = time.perf_counter()
report = workflows_reconcile()
seconds = time.perf_counter() - started

def count(value):
    return value if isinstance(value, int) else len(value)

print(json.dumps({"seconds": seconds, "requeued": count(report.requeued),
                  "failed": count(report.failed)}))
"""


def _sweep_rows(
    *, rows: int, stale: int, stale_after: int, customer_id: str, now: dt.datetime
) -> Iterator[str]:
    """COPY text lines: `stale` pending rows untouched for longer than the sweep's threshold;
    the rest mostly COMPLETED over the last 30 days, 1% FAILED, 1% recent pending ones, and
    0.1% REVIEW ones, days old but not expired (which the sweep must leave to the reviewer)."""
    recent = max(1, rows // 100)
    review = max(1, rows // 1000)
    failed = max(1, rows // 100)
    completed = rows - stale - recent - review - failed
    if completed < 0:
        raise ValueError(f"{rows} rows cannot hold {stale} stale ones and the others")
    kinds = (
        [_STALE] * stale
        + [_RECENT] * recent
        + [_REVIEW] * review
        + [_FAILED] * failed
        + [_COMPLETED] * completed
    )
    rng = random.Random(20260101)
    rng.shuffle(kinds)  # spread over the table's pages, as months of traffic would
    tag = secrets.token_hex(6)
    old = stale_after + 3600  # well past the threshold, however long the load takes
    month = 30 * 86400
    null = "\\N"
    for index, kind in enumerate(kinds):
        ids = [f"{index:08x}-{kind}00{n}-4000-8000-{tag}" for n in range(4)]
        result = claim_id = claimed_until = search_id = null
        reason = ""
        attempts = 1
        if kind == _STALE:
            state = ("RECEIVED", "IN_PROGRESS", "REQUESTED")[index % 3]
            # Within the last 12 hours, well inside WORKFLOW_DEADLINE_SECONDS (24 h): an older
            # pending row is not re-queued but failed, "deadline exceeded".
            created = updated = now - dt.timedelta(seconds=old + rng.randrange(12 * 3600))
        elif kind == _RECENT:
            state = ("RECEIVED", "IN_PROGRESS")[index % 2]
            created = updated = now - dt.timedelta(seconds=rng.randrange(60))
        else:
            # Reviews within REVIEW_TIMEOUT_SECONDS (7 days): older ones the sweep would expire.
            spread = 6 * 86400 - old if kind == _REVIEW else month
            created = now - dt.timedelta(seconds=old + rng.randrange(spread))
            updated = created + dt.timedelta(seconds=1)
            state = {_REVIEW: "REVIEW", _FAILED: "FAILED", _COMPLETED: "COMPLETED"}[kind]
        if state == "RECEIVED":
            attempts = 0
        elif state == "IN_PROGRESS":
            # A crashed worker's claim, long expired for the stale ones.
            claim_id = ids[3]
            claimed_until = (updated + dt.timedelta(seconds=120)).isoformat()
        elif state == "REQUESTED":
            search_id = f"bench-{tag}-{index}"
        elif state == "COMPLETED":
            result = ("LINKED", "LINKED", "LINKED", "NO_RESULTS")[index % 4]
            reason = "no match" if result == "NO_RESULTS" else ""
        elif state == "FAILED":
            reason = "internal search: 400 invalid"
        yield (
            f"{ids[0]}\t{ids[1]}\t{customer_id}\t{ids[2]}\tLINK\t{state}\t{result}\t{reason}\t"
            f"{attempts}\t0\t{claim_id}\t{claimed_until}\t\t{search_id}\t"
            f"{created.isoformat()}\t{updated.isoformat()}\n"
        )


def sweep(stack: BenchStack, *, rows: int, stale: int) -> dict[str, Any]:
    """One reconciliation sweep over `rows` workflows of which `stale` are stale, timed inside
    its own process (start-up excluded); then checks it re-queued exactly the stale ones."""
    stale_after = int(
        stack.python(
            "import django; django.setup(); from django.conf import settings; "
            "print(settings.RECONCILE_STALE_AFTER_SECONDS)"
        ).strip()
    )
    now = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    with stack.db() as conn:
        # The earlier stages' workflows (and everything hanging off them) go: the table holds
        # exactly the rows described, so the count of re-queued rows can be checked exactly.
        conn.execute("TRUNCATE workflows_workflow CASCADE")
        copy_sql = f"COPY workflows_workflow ({_COLUMNS}) FROM STDIN"
        with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            chunk: list[str] = []
            for line in _sweep_rows(
                rows=rows,
                stale=stale,
                stale_after=stale_after,
                customer_id=stack.customer_id,
                now=now,
            ):
                chunk.append(line)
                if len(chunk) == 20_000:
                    copy.write("".join(chunk))
                    chunk.clear()
            copy.write("".join(chunk))
        loaded = time.monotonic() - started
        # VACUUM as well as ANALYZE: a freshly loaded table would otherwise draw autovacuum
        # (its insert threshold) into the timed sweep; and a table in use for months has its
        # visibility map set.
        conn.execute("VACUUM (ANALYZE) workflows_workflow")
        size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('workflows_workflow'))"
        ).fetchone()
        outcome = json.loads(stack.python(_SWEEP_SNIPPET).strip().splitlines()[-1])
        changed = conn.execute(_SWEEP_CHECK, {"stale": _STALE, "failed": _FAILED}).fetchone()
    assert changed is not None
    figures = {
        "rows": rows,
        "stale": stale,
        "stale_after_seconds": stale_after,
        "seconds": round(outcome["seconds"], 4),
        "requeued": outcome["requeued"],
        "failed": outcome["failed"],
        "rows_requeued_in_db": int(changed[0]),
        "stale_rows_requeued_in_db": int(changed[1]),
        "rows_failed_by_the_sweep": int(changed[2]),
        "load_seconds": round(loaded, 1),
        "table_size": size[0] if size else None,
    }
    if (outcome["requeued"], outcome["failed"], *changed) != (stale, 0, stale, stale, 0):
        raise StageFailed(f"the sweep did not re-queue exactly the {stale} stale rows: {figures}")
    return figures
