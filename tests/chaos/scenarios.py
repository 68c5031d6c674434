"""The fault scenarios. Each builds its own stack, drives load, injects its fault, and returns
a Verdict; `quick=True` is the short version that runs in `make test`."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import redis
from celery import Celery

from standin.receiver import Step
from tests.chaos.checks import (
    REVIEW,
    Verdict,
    accepted_ids,
    answers,
    check,
    settled,
    wait_terminal,
)
from tests.chaos.load import Posted, link_body, post_at_rate, post_batch, post_link, post_many
from tests.chaos.stack import FAST_SETTINGS, Stack
from tests.processes import BIN, wait_for_text


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    run: Callable[[bool], Verdict]


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(line) for line in out.split()]


def _label(number: int, name: str, broker: str) -> str:
    return f"{number} {name}" + (" (RabbitMQ)" if broker == "rabbitmq" else "")


def _in_background(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# 1 -------------------------------------------------------------------------------------------
def kill_worker_children(quick: bool, broker: str = "redis", number: int = 1) -> Verdict:
    """SIGKILL prefork worker children again and again while workflows are processed."""
    count, kills_wanted = (60, 8) if quick else (300, 40)
    stack = Stack(
        f"s1{broker}",
        worker_pool="prefork",
        worker_concurrency=3,
        standin_latency_ms=40,
        broker=broker,
    )
    with stack:
        kills = 0
        done = threading.Event()

        def killer() -> None:
            nonlocal kills
            rng = random.Random(1)
            while not done.is_set() or kills < kills_wanted:
                worker = stack.procs[f"worker{rng.randrange(stack.celery_workers)}"]
                children = _children(worker.pid)
                if children:
                    try:
                        subprocess.run(["kill", "-9", str(rng.choice(children))], check=False)
                        kills += 1
                    except OSError:
                        pass
                time.sleep(0.25)
                if kills >= kills_wanted and done.is_set():
                    return

        thread = _in_background(killer)
        posted = post_many(stack, count, concurrency=6, pause=0.02)
        done.set()
        thread.join(120)
        verdict = check(
            stack,
            _label(number, "kill worker children", broker),
            posted,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )
        verdict.note(f"{kills} SIGKILLs")
        if kills < kills_wanted:
            verdict.unexpected += 1
        return verdict


# 2 -------------------------------------------------------------------------------------------
def kill_whole_worker(quick: bool, broker: str = "redis", number: int = 2) -> Verdict:
    count = 60 if quick else 300
    with Stack(f"s2{broker}", standin_latency_ms=40, broker=broker) as stack:

        def chaos() -> None:
            time.sleep(1.5)
            for index in range(stack.celery_workers):
                stack.kill(f"worker{index}", signal.SIGKILL)
            time.sleep(2)
            for index in range(stack.celery_workers):
                stack.start_worker(index)

        thread = _in_background(chaos)
        posted = post_many(stack, count, concurrency=6, pause=0.02)
        thread.join(60)
        return check(
            stack,
            _label(number, "kill whole worker", broker),
            posted,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )


# 3 -------------------------------------------------------------------------------------------
def kill_redis_with_queue(quick: bool) -> Verdict:
    """kill -9 Redis while workflows sit in the queue; it comes back empty."""
    count = 100 if quick else 500
    # Small batches and slow searches, so that most messages still wait when Redis dies.
    settings = {"WORKER_BATCH_SIZE": "2"}
    with Stack("s3", standin_latency_ms=300, worker_concurrency=2, settings=settings) as stack:
        posted = post_many(stack, count, concurrency=8)
        queued = stack.queued()
        stack.stop_redis(signal.SIGKILL)
        time.sleep(1)
        stack.start_redis()
        stack.control_standin("config", {"latency_ms": 0})
        verdict = check(
            stack, "3 kill -9 Redis", posted, deadline_seconds=180, allow_webhook_duplicates=True
        )
        if queued == 0:  # the fault must have met a queue
            verdict.unexpected += 1
        verdict.note(f"{queued} messages queued when Redis was killed")
        return verdict


# 4 -------------------------------------------------------------------------------------------
def pause_redis(quick: bool) -> Verdict:
    """Redis frozen (SIGSTOP): every POST still answers within 2 s, 202 or 503."""
    count, pause_seconds = (60, 4) if quick else (200, 10)
    with Stack("s4") as stack:

        def freeze() -> None:
            time.sleep(0.5)
            stack.pause_redis()
            time.sleep(pause_seconds)
            stack.resume_redis()

        thread = _in_background(freeze)
        posted = post_many(stack, count, concurrency=4, pause=pause_seconds / count * 4)
        thread.join(30)
        verdict = check(
            stack, "4 Redis paused", posted, deadline_seconds=120, allow_webhook_duplicates=True
        )
        _ack_bounds(stack, verdict, posted, bound=2.0)
        return verdict


def _ack_bounds(stack: Stack, verdict: Verdict, posted: list[Posted], *, bound: float) -> None:
    """Every answer within `bound`: 202 with a committed row, or 503 with none."""
    slow = [p for p in posted if p.elapsed > bound]
    wrong = [p for p in posted if p.status not in (202, 503)]
    verdict.unexpected += len(slow) + len(wrong)
    if slow:
        verdict.note(
            f"{len(slow)} answers slower than {bound}s (max {max(p.elapsed for p in slow):.2f}s)"
        )
    if wrong:
        verdict.note(f"answers other than 202/503: {dict(answers(wrong))}")
    refused = {p.key: p for p in posted if p.status == 503}
    with stack.db() as conn:
        written = [
            (key, str(workflow_id))
            for key, workflow_id in conn.execute(
                "SELECT key, workflow_id FROM linking_idempotencyrecord WHERE key = ANY(%s)",
                [list(refused)],
            )
        ]
    # A 503 with rows behind it: PostgreSQL, killed with -m immediate, had made the commit
    # durable but the answer never left (no service can tell its client about a commit it could
    # not report). The client's documented recovery must converge: the same request with the
    # same key replays that workflow's 202, and the workflow ends like the others.
    diverged = 0
    for key, workflow_id in written:
        original = refused[key]
        assert original.body is not None
        retry = post_link(stack, original.body, key, original.kind)
        converged = retry.status == 202 and retry.replayed and retry.workflow_id == workflow_id
        if converged:
            review = frozenset([workflow_id] if original.expected_result == REVIEW else [])
            deadline = time.monotonic() + 60
            statuses = wait_terminal(stack, [workflow_id], deadline=deadline, review=review)
            converged = settled(workflow_id, statuses.get(workflow_id), review)
        diverged += not converged
    verdict.unexpected += diverged
    if written:
        verdict.note(
            f"{len(written)} requests answered 503 had committed (the answer was lost with the "
            f"server); retried with the same key, {len(written) - diverged} replayed their 202 "
            "and ended"
        )
    verdict.note(f"answers {dict(answers(posted))}, slowest {max(p.elapsed for p in posted):.2f}s")


# 5 -------------------------------------------------------------------------------------------
def restart_redis_repeatedly(quick: bool) -> Verdict:
    """Redis restarted 5 times in 30 s; workers consume again within 60 s of the last."""
    restarts, window = (3, 6) if quick else (5, 30)
    with Stack("s5") as stack:
        posted: list[Posted] = []
        for _ in range(restarts):
            posted += post_many(stack, 10, concurrency=4)
            stack.stop_redis(signal.SIGKILL)
            time.sleep(0.5)
            stack.start_redis()
            time.sleep(window / restarts - 0.5)
        last_restart = time.monotonic()
        # Consumption, not the sweep: stop beat so only a live consumer can finish these.
        stack.kill("beat", signal.SIGTERM)
        after = post_many(stack, 20, concurrency=4)
        ids = accepted_ids(after)
        # The ambiguous patients of the mix end in REVIEW, for a person: consumed, all the same.
        review = frozenset(
            p.workflow_id for p in after if p.workflow_id and p.expected_result == REVIEW
        )
        statuses = wait_terminal(stack, ids, deadline=last_restart + 60, review=review)
        consumed_in = time.monotonic() - last_restart
        stack.start_beat()
        verdict = check(
            stack,
            "5 Redis restarted",
            posted + after,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )
        unfinished = [i for i in ids if not settled(i, statuses.get(i), review)]
        if unfinished:
            verdict.unexpected += len(unfinished)
            verdict.note(f"{len(unfinished)} new workflows not consumed within 60 s")
        verdict.note(f"consuming again {consumed_in:.1f}s after the last restart")
        return verdict


# 6 -------------------------------------------------------------------------------------------
def restart_postgres(quick: bool) -> Verdict:
    """PostgreSQL restarted with -m immediate under load: fast 503s while down, then resume."""
    duration = 8 if quick else 20
    with Stack("s6", own_postgres=True) as stack:
        posted: list[Posted] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                posted.extend(post_many(stack, 8, concurrency=4))

        thread = _in_background(load)
        time.sleep(duration / 3)
        stack.restart_postgres_immediate()
        time.sleep(duration * 2 / 3)
        stop.set()
        thread.join(60)
        verdict = check(
            stack,
            "6 PostgreSQL restart",
            posted,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )
        _ack_bounds(stack, verdict, posted, bound=3.0)
        return verdict


def _poster(stack: Stack, body: dict[str, object], key: str) -> Callable[[int], Posted]:
    return lambda _: post_link(stack, body, key, "certain")


# 7 -------------------------------------------------------------------------------------------
def same_key_storm(quick: bool) -> Verdict:
    """50 concurrent POSTs with one key, many rounds: one workflow per key, no 5xx."""
    rounds = 20 if quick else 1000
    with Stack("s7", web_workers=3) as stack:
        posted: list[Posted] = []
        with ThreadPoolExecutor(max_workers=50) as pool:
            for _ in range(rounds):
                key = f"storm-{uuid.uuid4()}"
                body = link_body("certain")
                posted += list(pool.map(_poster(stack, body, key), range(50)))
        verdict = check(stack, "7 same-key storm", posted, deadline_seconds=180)
        wrong = [p for p in posted if p.status not in (202, 409)]
        verdict.unexpected += len(wrong)
        if wrong:
            verdict.note(f"answers other than 202/409: {dict(answers(wrong))}")
        keys = {p.key for p in posted}
        with stack.db() as conn:
            (records,) = conn.execute(
                "SELECT count(*) FROM linking_idempotencyrecord"
            ).fetchone() or (0,)
            (workflows,) = conn.execute("SELECT count(*) FROM workflows_workflow").fetchone() or (
                0,
            )
        if workflows != len(keys) or records != len(keys):
            verdict.duplicated += abs(workflows - len(keys))
            verdict.note(f"{len(keys)} keys, {workflows} workflows, {records} records")
        verdict.note(f"answers {dict(answers(posted))}")
        return verdict


# 8 -------------------------------------------------------------------------------------------
def duplicate_messages(quick: bool, broker: str = "redis", number: int = 8) -> Verdict:
    """Every task message in the queue 2-3 times: one mapping, one end, one webhook each."""
    count = 40 if quick else 300
    with Stack(f"s8{broker}", broker=broker) as stack:
        for index in range(stack.celery_workers):
            stack.kill(f"worker{index}", signal.SIGTERM)
        stack.kill("beat", signal.SIGTERM)  # only the workflows' messages in the queue
        # No consumer, and a dispatcher of its own publishes: the messages wait in the queue.
        dispatch = stack.spawn("dispatch", [str(BIN / "python"), "manage.py", "dispatch"])
        wait_for_text(dispatch.log, "dispatcher leading", timeout=30)
        posted = []
        for _ in range(4):  # in groups, so that they are several messages
            posted += post_many(stack, count // 4, concurrency=4)
            time.sleep(0.3)
        ids = accepted_ids(posted)
        _queue_settled(stack)
        stack.kill("dispatch", signal.SIGTERM)
        published = re.findall(r"after publishing (\d+)", dispatch.log.read_text())
        rng = random.Random(8)
        messages, copies = stack.duplicate_queued(lambda: rng.choice((1, 2)))
        for index in range(stack.celery_workers):
            stack.start_worker(index)
        stack.start_beat()
        verdict = check(
            stack, _label(number, "duplicated messages", broker), posted, deadline_seconds=120
        )
        with stack.db() as conn:
            (mappings,) = conn.execute(
                "SELECT count(*) - count(DISTINCT workflow_id) FROM linking_patientmapping"
            ).fetchone() or (0,)
            (deliveries,) = conn.execute(
                "SELECT count(*) - count(DISTINCT workflow_id) FROM workflows_webhookdelivery"
            ).fetchone() or (0,)
        verdict.duplicated += mappings + deliveries
        # The scenario must have had every workflow's message in the queue, to duplicate.
        if messages < 2 or published != [str(len(ids))]:
            verdict.unexpected += 1
        verdict.note(
            f"{messages} messages ({published} of {len(ids)} workflows) queued as {copies}"
        )
        return verdict


def _queue_settled(stack: Stack, *, quiet: float = 1.0, timeout: float = 30) -> None:
    """Wait until the queue holds messages and its length has not changed for `quiet` s."""
    last, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = stack.queued()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


# 9 -------------------------------------------------------------------------------------------
def hostile_receiver(quick: bool) -> Verdict:
    """The receiver answers 500, times out, 301, then 410."""
    with Stack("s9") as stack:
        stack.receiver.respond_with(
            Step(status=500),
            Step(delay_ms=3000),
            Step(status=301, location="/elsewhere"),
            Step(status=410),
        )
        posted = post_many(stack, 1, kinds=["certain"])
        verdict = check(stack, "9 hostile receiver", posted, deadline_seconds=60)
        got = stack.receiver.deliveries()
        ids = {d.headers.get("webhook-id") for d in got}
        schedule = [int(x) for x in FAST_SETTINGS["WEBHOOK_RETRY_SCHEDULE"].split(",")]
        gaps = [round(b.received_at - a.received_at, 1) for a, b in pairwise(got)]
        problems = []
        if [d.answered for d in got] != [500, 200, 301, 410]:  # the timeout's answer came late
            problems.append(f"answers {[d.answered for d in got]}")
        if len(ids) != 1:
            problems.append(f"{len(ids)} webhook-ids")
        if not all(d.verified for d in got):
            problems.append("a bad signature")
        if any(d.path == "/elsewhere" for d in got):
            problems.append("the redirect was followed")
        # Gap i >= schedule[i]; the timed-out attempt adds up to WEBHOOK_TIMEOUT_SECONDS.
        if len(gaps) == 3 and not all(
            gap >= want - 0.2 for gap, want in zip(gaps, schedule, strict=False)
        ):
            problems.append(f"gaps {gaps} vs schedule {schedule[:3]}")
        with stack.db() as conn:
            row = conn.execute(
                "SELECT d.status, c.webhook_enabled, d.attempts FROM workflows_webhookdelivery d"
                " JOIN merchant_customer c ON c.id = d.customer_id"
            ).fetchone()
        if row is None or row[0] != "DISABLED" or row[1] is not False or row[2] != 4:
            problems.append(f"delivery/customer state {row}")
        verdict.unexpected += len(problems)
        for problem in problems:
            verdict.note(problem)
        verdict.note(f"gaps between attempts {gaps}s")
        return verdict


# 10 ------------------------------------------------------------------------------------------
def two_beats(quick: bool) -> Verdict:
    """Two beat processes sweep 200 idle workflows (waiting on nothing: neither due nor in
    flight, as after a lost asynchronous search callback): each made due exactly once."""
    count = 60 if quick else 200
    with Stack("s10") as stack:
        for index in range(stack.celery_workers):
            stack.kill(f"worker{index}", signal.SIGTERM)
        posted = post_many(stack, count, concurrency=8)
        redis.Redis(port=stack.redis_port).delete("celery")
        with stack.db() as conn:
            conn.execute(
                "UPDATE workflows_workflow SET updated_at = now() - interval '1 minute',"
                " due_at = NULL, published_at = NULL"
            )
        stack.start_beat("beat2")
        time.sleep(3)
        for index in range(stack.celery_workers):
            stack.start_worker(index)
        verdict = check(stack, "10 two beats", posted, deadline_seconds=120)
        stale_after = float(FAST_SETTINGS["RECONCILE_STALE_AFTER_SECONDS"])
        with stack.db() as conn:
            rows = conn.execute(
                "SELECT workflow_id, at FROM workflows_workflowtransition"
                " WHERE actor = 'sweep' AND source = target ORDER BY workflow_id, at"
            ).fetchall()
        twice = 0
        for (a_id, a_at), (b_id, b_at) in pairwise(rows):
            if a_id == b_id and (b_at - a_at).total_seconds() < stale_after:
                twice += 1
        verdict.duplicated += twice
        made_due = len({row[0] for row in rows})
        if made_due < len(accepted_ids(posted)):
            verdict.unexpected += 1  # the sweeps left idle work idle
        verdict.note(
            f"{len(rows)} made due by the sweeps ({made_due} workflows), {twice} within one"
            " stale window"
        )
        return verdict


# 11 ------------------------------------------------------------------------------------------
def flaky_internal_system(quick: bool) -> Verdict:
    """30% of searches fail with 5xx, and latency spikes to 2 s now and then."""
    count = 60 if quick else 300
    with Stack("s11") as stack:
        stack.control_standin("config", {"failure_rate": 0.3})
        stop = threading.Event()

        def spikes() -> None:
            while not stop.is_set():
                stack.control_standin("config", {"latency_ms": 2000})
                time.sleep(1)
                stack.control_standin("config", {"latency_ms": 0})
                time.sleep(2)

        thread = _in_background(spikes)
        posted = post_many(stack, count, concurrency=6, pause=0.02)
        verdict = check(stack, "11 flaky internal system", posted, deadline_seconds=180)
        stop.set()
        thread.join(10)
        with stack.db() as conn:
            (max_attempts,) = conn.execute(
                "SELECT coalesce(max(attempts), 0) FROM workflows_workflow"
            ).fetchone() or (0,)
        cap = int(FAST_SETTINGS["WORKFLOW_MAX_ATTEMPTS"])
        if max_attempts > cap:
            verdict.unexpected += 1
        verdict.note(f"max attempts {max_attempts} (cap {cap})")
        return verdict


# 12 ------------------------------------------------------------------------------------------
# Issue 17's reproduction: short windows (a sweep every 2 s, stale after 5 s, 3 attempts), a
# lease the setting checks accept (time limit 12 + longest backoff 2), searches of 2.5 s.
MID_SEARCH_SETTINGS = {
    "RECONCILE_INTERVAL_SECONDS": "2",
    "RECONCILE_STALE_AFTER_SECONDS": "5",
    "WORKFLOW_MAX_ATTEMPTS": "3",
    "WORKFLOW_CLAIM_LEASE_SECONDS": "14",
    "INTERNAL_SEARCH_READ_TIMEOUT": "4",
}


def kill_worker_mid_search(quick: bool) -> Verdict:
    """SIGKILL every worker process while its searches are under way, and start new ones:
    the dead claims are the sweep's once their lease has run out, and cost one attempt each."""
    count, rounds = (30, 1) if quick else (100, 2)
    settings = MID_SEARCH_SETTINGS
    with Stack("s12", settings=settings, standin_latency_ms=2500) as stack:
        posted = post_many(stack, count, kinds=["certain"], concurrency=8)
        ids = accepted_ids(posted)
        in_search: list[int] = []
        for attempt in range(1, rounds + 1):
            in_search.append(_kill_during_searches(stack, ids, attempt)[0])
        verdict = check(stack, "12 kill worker mid-search", posted, deadline_seconds=150)
        with stack.db() as conn:
            attempts = dict(
                conn.execute(
                    "SELECT attempts, count(*) FROM workflows_workflow"
                    " WHERE id = ANY(%s::uuid[]) GROUP BY 1",
                    [ids],
                ).fetchall()
            )
        cap = int(settings["WORKFLOW_MAX_ATTEMPTS"])
        # A dead claim costs its one attempt and no more: none may reach the cap early.
        if max(attempts, default=0) > rounds + 1:
            verdict.unexpected += 1
        if min(in_search) < len(ids) // 2:  # the fault must have hit most of them
            verdict.unexpected += 1
        verdict.note(
            f"in the search when killed: {in_search}; attempts {dict(sorted(attempts.items()))}"
            f" (cap {cap})"
        )
        return verdict


def _wait_in_search(stack: Stack, ids: list[str], attempt: int) -> int:
    """Wait until every unfinished workflow is in its `attempt`th attempt's search (claimed
    again once the sweep has re-queued it, after a kill); how many are."""
    deadline = time.monotonic() + 60
    while True:
        with stack.db() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'IN_PROGRESS' AND attempts >= %s),"
                " count(*) FILTER (WHERE status NOT IN ('COMPLETED', 'FAILED'))"
                " FROM workflows_workflow WHERE id = ANY(%s::uuid[])",
                [attempt, ids],
            ).fetchone()
        claimed, unfinished = row if row else (0, 0)
        if (claimed and claimed == unfinished) or time.monotonic() > deadline:
            return int(claimed)
        time.sleep(0.1)


def _kill_during_searches(stack: Stack, ids: list[str], attempt: int) -> tuple[int, float]:
    """Once every unfinished workflow is in its `attempt`th search, SIGKILL every worker's
    process group and start new workers; how many were in a search, and when (wall clock) the
    kill was sent."""
    claimed = _wait_in_search(stack, ids, attempt)
    time.sleep(0.5)  # well inside the searches
    killed_at = time.time()
    for index in range(stack.celery_workers):
        stack.kill(f"worker{index}", signal.SIGKILL)
    time.sleep(1)
    for index in range(stack.celery_workers):
        stack.start_worker(index)
    return claimed, killed_at


# 15 ------------------------------------------------------------------------------------------
def restart_rabbitmq(quick: bool) -> Verdict:
    """RabbitMQ stops serving (stop_app) and comes back, several times, under load: every POST
    answers 202 (the web process never needs the broker), nothing is lost, consuming resumes."""
    restarts = 2 if quick else 5
    with Stack("s15", broker="rabbitmq", standin_latency_ms=40) as stack:
        posted: list[Posted] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                posted.extend(post_many(stack, 8, concurrency=4, pause=0.02))

        thread = _in_background(load)
        for _ in range(restarts):
            time.sleep(2)
            stack.restart_rabbitmq_app(down_seconds=3)
        time.sleep(2)
        stop.set()
        thread.join(60)
        verdict = check(
            stack,
            "15 RabbitMQ restarted",
            posted,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )
        wrong = [p for p in posted if p.status != 202]
        verdict.unexpected += len(wrong)
        verdict.note(f"{restarts} restarts; answers {dict(answers(posted))}")
        return verdict


# 17 ------------------------------------------------------------------------------------------
def kill_worker_mid_batch(quick: bool) -> Verdict:
    """Batches where every other search answers at once and the rest take 4 s: SIGKILL every
    worker once the fast half is committed and the slow half in flight, and start new ones."""
    count = 40 if quick else 100
    # Read timeout above the slow searches (setting rules: connect + read < soft limit 8, and
    # < the lease).
    settings = {"INTERNAL_SEARCH_READ_TIMEOUT": "5", "WORKFLOW_CLAIM_LEASE_SECONDS": "8"}
    with Stack("s17", settings=settings) as stack:
        steps = [{"delay_ms": 0 if index % 2 else 4000} for index in range(count)]
        stack.control_standin("script", {"responses": steps})
        posted = post_many(stack, count, kinds=["certain"], concurrency=8)
        ids = accepted_ids(posted)
        deadline = time.monotonic() + 30
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = _statuses(stack, ids)
            if counts.get("COMPLETED", 0) >= count // 2 - 2 and counts.get("IN_PROGRESS", 0):
                break
            time.sleep(0.1)
        for index in range(stack.celery_workers):
            stack.kill(f"worker{index}", signal.SIGKILL)
        time.sleep(1)
        for index in range(stack.celery_workers):
            stack.start_worker(index)
        verdict = check(
            stack,
            "17 kill worker mid-batch",
            posted,
            deadline_seconds=120,
            allow_webhook_duplicates=True,
        )
        committed, in_flight = counts.get("COMPLETED", 0), counts.get("IN_PROGRESS", 0)
        if committed < count // 4 or in_flight < count // 4:  # the kill must split the batches
            verdict.unexpected += 1
        verdict.note(f"when killed: {committed} ended and committed, {in_flight} in their search")
        return verdict


def _statuses(stack: Stack, ids: list[str]) -> dict[str, int]:
    with stack.db() as conn:
        return dict(
            conn.execute(
                "SELECT status, count(*) FROM workflows_workflow"
                " WHERE id = ANY(%s::uuid[]) GROUP BY 1",
                [ids],
            ).fetchall()
        )


# 18 ------------------------------------------------------------------------------------------
def overlapping_batches(quick: bool) -> Verdict:
    """Messages whose batches repeat ids and overlap one another, consumed at once by two
    workers: every workflow is claimed once (one attempt), ends once, one webhook each."""
    count = 60 if quick else 300
    with Stack("s18") as stack:
        for name in [f"worker{index}" for index in range(stack.celery_workers)] + ["beat"]:
            stack.kill(name, signal.SIGTERM)  # nobody publishes or consumes meanwhile
        posted = post_many(stack, count, kinds=["certain", "none"], concurrency=8)
        ids = accepted_ids(posted)
        # Batch i: ids [10i, 10i + 25) and its first three again; each id is in 2-3 batches.
        batches = [
            ids[start : start + 25] + ids[start : start + 3] for start in range(0, count, 10)
        ]
        app = Celery(broker=stack.broker_url, set_as_current=False)
        try:
            for batch in batches:
                app.send_task("workflows.process_workflows", args=(batch,), queue=stack.QUEUE)
        finally:
            app.close()
        for index in range(stack.celery_workers):
            stack.start_worker(index)
        stack.start_beat()
        verdict = check(stack, "18 overlapping batches", posted, deadline_seconds=120)
        with stack.db() as conn:
            attempts = dict(
                conn.execute(
                    "SELECT attempts, count(*) FROM workflows_workflow"
                    " WHERE id = ANY(%s::uuid[]) GROUP BY 1",
                    [ids],
                ).fetchall()
            )
            (mappings,) = conn.execute(
                "SELECT count(*) - count(DISTINCT workflow_id) FROM linking_patientmapping"
            ).fetchone() or (0,)
            (deliveries,) = conn.execute(
                "SELECT count(*) - count(DISTINCT workflow_id) FROM workflows_webhookdelivery"
            ).fetchone() or (0,)
        verdict.duplicated += (
            mappings + deliveries + sum(n for attempt, n in attempts.items() if attempt != 1)
        )
        verdict.note(
            f"{len(batches)} messages of {len(batches[0])} ids for {len(ids)} workflows;"
            f" attempts {dict(sorted(attempts.items()))}"
        )
        return verdict


# 19-22 ---------------------------------------------------------------------------------------
# Issue 32: a crash costs about a lease, a deploy costs nothing. Every timing setting at its
# default (lease 30 s, heartbeat 10 s, grace 10 s, stale window 420 s, 5 attempts, search timeouts
# 3.05 + 10 s...) except a sweep every 5 s; the quick version is the reproduction.
def at_defaults(**overrides: str) -> dict[str, str]:
    """FAST_SETTINGS' timing keys back at the service's defaults, then `overrides`."""
    from django.conf import settings

    def text(value: object) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return {name: text(getattr(settings, name)) for name in FAST_SETTINGS} | overrides


# Issue 32's reproduction: sweep every 2 s, stale after 5 s, 3 attempts, 3 s read timeout.
CRASH_QUICK_SETTINGS = {
    "RECONCILE_INTERVAL_SECONDS": "2",
    "RECONCILE_STALE_AFTER_SECONDS": "5",
    "WORKFLOW_MAX_ATTEMPTS": "3",
    "INTERNAL_SEARCH_READ_TIMEOUT": "3",
}


def _completed_since(stack: Stack, ids: list[str], since: float) -> tuple[float, int]:
    """Seconds from `since` (wall clock) to the last COMPLETED among `ids`; how many ended
    after `since`."""
    with stack.db() as conn:
        row = conn.execute(
            "SELECT max(extract(epoch FROM t.at)), count(*) FILTER (WHERE t.at > to_timestamp(%s))"
            " FROM workflows_workflowtransition t"
            " WHERE t.workflow_id = ANY(%s::uuid[]) AND t.target = 'COMPLETED'",
            [since, ids],
        ).fetchone()
    last, after = row if row else (None, 0)
    return (float(last) - since if last is not None else float("inf")), int(after)


def _attempts(stack: Stack, ids: list[str]) -> dict[int, int]:
    with stack.db() as conn:
        return dict(
            conn.execute(
                "SELECT attempts, count(*) FROM workflows_workflow"
                " WHERE id = ANY(%s::uuid[]) GROUP BY 1",
                [ids],
            ).fetchall()
        )


def crash_mid_search(quick: bool, broker: str = "redis", number: int = 19) -> Verdict:
    """SIGKILL every worker process (main and pool) while 100 workflows are in their 3 s search,
    and start new workers at once: the dead claims stop being renewed, their leases end, and
    the workflows resume then (the sweep; on RabbitMQ the redelivered messages). Prints the
    time from the kill to the last COMPLETED (target: lease + sweep interval + search, <= 45 s)."""
    count, latency, settings = (
        (30, 2500, at_defaults(**CRASH_QUICK_SETTINGS))
        if quick
        else (100, 3000, at_defaults(RECONCILE_INTERVAL_SECONDS="5"))
    )
    target = 45.0 if not quick else 40.0
    name = "crash mid-search" + (" (RabbitMQ)" if broker == "rabbitmq" else "")
    with Stack(f"s{number}", settings=settings, standin_latency_ms=latency, broker=broker) as stack:
        posted = post_many(stack, count, kinds=["certain"], concurrency=8)
        ids = accepted_ids(posted)
        in_search, killed_at = _kill_during_searches(stack, ids, 1)
        verdict = check(stack, f"{number} {name}", posted, deadline_seconds=150)
        took, after = _completed_since(stack, ids, killed_at)
        attempts = _attempts(stack, ids)
        if took > target:
            verdict.unexpected += 1
        # A dead claim costs its one attempt and no more.
        if max(attempts, default=0) > 2:
            verdict.unexpected += 1
        if in_search < len(ids) // 2:  # the fault must have hit most of them
            verdict.unexpected += 1
        verdict.note(
            f"kill -> last COMPLETED {took:.1f} s (target {target:.0f}); {in_search} in their"
            f" search when killed, {after} completed after;"
            f" attempts {dict(sorted(attempts.items()))}"
        )
        return verdict


def deploy_mid_search(quick: bool, broker: str = "redis", number: int = 20) -> Verdict:
    """SIGTERM every worker (a deploy) while 200 workflows are in their 4 s search and start
    new ones at once: the old workers claim nothing more, end what their grace period saw
    finish, hand back the rest; nobody waits for a lease. Prints the longest time from the
    SIGTERM to a COMPLETED (target <= 15 s)."""
    count = 60 if quick else 200
    target = 15.0
    name = "deploy mid-search" + (" (RabbitMQ)" if broker == "rabbitmq" else "")
    # The quick version (make test) shortens the grace below the searches, so that the
    # hand-back itself is what it checks: every search in flight is handed back and resumed.
    grace = {"WORKER_SHUTDOWN_GRACE_SECONDS": "1"} if quick else {}
    settings = at_defaults(RECONCILE_INTERVAL_SECONDS="5", **grace)
    with Stack(f"s{number}", settings=settings, standin_latency_ms=4000, broker=broker) as stack:
        posted = post_many(stack, count, kinds=["certain"], concurrency=8)
        ids = accepted_ids(posted)
        in_search = _wait_in_search(stack, ids, 1)
        time.sleep(0.5)
        stopping = []
        sent_at = time.time()
        for index in range(stack.celery_workers):
            proc = stack.procs[f"worker{index}"]
            proc.expected_down = True
            os.killpg(proc.pid, signal.SIGTERM)
            stopping.append(proc)
        for index in range(stack.celery_workers):
            stack.start_worker(index, node=f"chaos{index}-next")
        verdict = check(stack, f"{number} {name}", posted, deadline_seconds=120)
        took, after = _completed_since(stack, ids, sent_at)
        attempts = _attempts(stack, ids)
        with stack.db() as conn:
            (handed,) = conn.execute(
                "SELECT count(*) FROM workflows_workflowtransition"
                " WHERE workflow_id = ANY(%s::uuid[]) AND reason LIKE 'handed back%%'",
                [ids],
            ).fetchone() or (0,)
        exits: list[int | None] = []
        for proc in stopping:
            try:
                exits.append(proc.popen.wait(30))
            except subprocess.TimeoutExpired:
                exits.append(None)
                verdict.unexpected += 1
        if took > target:
            verdict.unexpected += 1
        if max(attempts, default=0) > 1:  # a hand-back refunds its attempt
            verdict.unexpected += 1
        if in_search < len(ids) // 2 or (quick and handed < in_search):
            verdict.unexpected += 1
        verdict.note(
            f"SIGTERM -> last COMPLETED {took:.1f} s (target {target:.0f}); {in_search} in their"
            f" search at the SIGTERM, {after} completed after it, {handed} handed back;"
            f" attempts {dict(sorted(attempts.items()))}; old workers exited {exits}"
        )
        return verdict


# 23-28 ---------------------------------------------------------------------------------------
# The schedule (workflows/scheduler.py): an outage of the internal system met by the circuit
# breaker, a noisy neighbour met by the fair rounds, a backlog met by the bound on work in
# flight. Each prints the settings it chose.


def _setting(stack: Stack, name: str) -> tuple[str, bool]:
    """A setting as the stack's processes have it, and whether it is the service's default
    (the stack leaves it alone)."""
    from django.conf import settings

    env = stack.env()
    return (env[name], False) if name in env else (str(getattr(settings, name)), True)


def _settings_note(stack: Stack, names: list[str]) -> str:
    """The stack's processes and these settings as its processes have them."""
    shown = []
    for name in names:
        value, default = _setting(stack, name)
        shown.append(f"{name}={value!r}" + (" (default)" if default else ""))
    return (
        f"settings: {stack.celery_workers} workers x {stack.worker_concurrency}"
        f" {stack.worker_pool}, " + ", ".join(shown)
    )


def _percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (`share` in 0..1) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def _total(values: dict[str, float]) -> int:
    return round(sum(values.values()))


def _first_last_completed(stack: Stack, ids: list[str], since: float) -> tuple[float, float]:
    """Seconds from `since` (wall clock) to the first and to the last COMPLETED among `ids`
    that ended after it."""
    with stack.db() as conn:
        row = conn.execute(
            "SELECT min(extract(epoch FROM at)), max(extract(epoch FROM at))"
            " FROM workflows_workflowtransition"
            " WHERE workflow_id = ANY(%s::uuid[]) AND target = 'COMPLETED'"
            " AND at > to_timestamp(%s)",
            [ids, since],
        ).fetchone()
    if not row or row[0] is None:
        return float("inf"), float("inf")
    return float(row[0]) - since, float(row[1]) - since


OUTAGE_SETTINGS = {
    # The issue's: 3 attempts (an outage must cost none of them), a probe every 2 s.
    "WORKFLOW_MAX_ATTEMPTS": "3",
    "INTERNAL_SEARCH_BREAKER_FAILURES": "5",
    "INTERNAL_SEARCH_BREAKER_PROBE_SECONDS": "2",
    "WORKFLOW_IN_FLIGHT_MAX": "200",
    # 30 POSTs a second from three customers: the per-customer rate limit is not under test.
    "RATE_LIMIT_LINK_CREATE": "",
}


def outage(quick: bool, broker: str = "redis", number: int = 23) -> Verdict:
    """The internal system down 60 s under 30 POSTs/s from three customers: connections refused
    20 s (the stand-in stopped), then 503 to everything 20 s, then hanging 20 s (calls read, never
    answered), then back. The breaker opens on the first failures and nothing is searched while
    it is open but its probe, once per probe interval: what the internal system receives while
    down is the probes and at most the work in flight when it failed. No attempt is spent on the
    outage: nothing FAILED (3 attempts), every workflow LINKED within 60 s of the recovery, one
    webhook each. Prints the calls received while down and the recovery time."""
    phase, rate, lead = (6.0, 10.0, 2.0) if quick else (20.0, 30.0, 5.0)
    down_seconds = 3 * phase
    with Stack(
        f"s{number}",
        settings=OUTAGE_SETTINGS,
        standin_latency_ms=50,
        broker=broker,
        worker_metrics=True,
    ) as stack:
        customers = [stack.add_customer(f"Outage {n}") for n in (2, 3)]
        tokens = [stack.token, *(c.token for c in customers)]
        posted: list[Posted] = []

        def load() -> None:
            posted.extend(
                post_at_rate(
                    stack,
                    rate=rate,
                    seconds=down_seconds + 2 * lead,
                    tokens=tokens,
                    kinds=["certain"],
                )
            )

        thread = _in_background(load)
        time.sleep(lead)
        stack.stop_standin()  # refused
        time.sleep(phase)
        stack.start_standin(outage="503")  # fresh counters: all it receives is while down
        time.sleep(phase)
        in_503 = stack.standin_stats()["outage_calls"]
        stack.control_standin("config", {"outage": "hang"})
        time.sleep(phase)
        received = stack.standin_stats()["outage_calls"]
        stack.control_standin("config", {"outage": ""})
        up_at, up_mono = time.time(), time.monotonic()
        thread.join(60)
        ids = accepted_ids(posted)
        verdict = check(
            stack,
            _label(number, "internal system down", broker),
            posted,
            deadline_seconds=max(5.0, up_mono + 60 - time.monotonic()),
        )
        first, last = _first_last_completed(stack, ids, up_at)
        # The backlog alone: the workflows accepted before the recovery.
        backlog = accepted_ids([p for p in posted if p.answered_at < up_at])
        _, drained = _first_last_completed(stack, backlog, up_at)
        interval = float(OUTAGE_SETTINGS["INTERNAL_SEARCH_BREAKER_PROBE_SECONDS"])
        # workflows/scheduler.py in_flight_bound(): what may be in flight, so searching, at once.
        bound = min(
            int(_setting(stack, "WORKFLOW_IN_FLIGHT_MAX")[0]),
            int(_setting(stack, "INTERNAL_SEARCH_MAX_CONCURRENCY")[0]),
        )
        probes, searches = received["metadata"], received["match"]
        others = sum(received.values()) - probes - searches
        # The stand-in receives nothing while it refuses: the probes it can see are those of
        # the 503 and hang phases; the scheduler's own count covers the whole outage (its
        # probes that were refused too) and the one that found it back.
        probes_allowed = int((2 * phase) / interval) + 2
        made = _total(
            stack.worker_counter("merchant_internal_search_seconds_count", 'operation="probe"')
        )
        made_allowed = int(down_seconds / interval) + 2 + 1
        opened = _total(stack.worker_counter("merchant_breaker_transitions_total", 'to="open"'))
        closed = _total(stack.worker_counter("merchant_breaker_transitions_total", 'to="closed"'))
        attempts = _attempts(stack, ids)
        wrong = [p for p in posted if p.status != 202]
        problems = [
            (probes > probes_allowed, f"{probes} probes received while down > {probes_allowed}"),
            (made > made_allowed, f"{made} probes made > {made_allowed}"),
            (
                searches > bound,
                f"{searches} searches received while down > the bound on work in flight {bound}",
            ),
            (others > 0, f"{others} other calls received while down"),
            (last > 60, f"recovery -> last COMPLETED {last:.1f} s > 60 s"),
            (opened < 1, "the breaker never opened"),
            (closed < 1, "the breaker never closed"),
            (bool(wrong), f"answers other than 202: {dict(answers(wrong))}"),
        ]
        for broken, problem in problems:
            if broken:
                verdict.unexpected += 1
                verdict.note(problem)
        verdict.note(
            _settings_note(
                stack,
                [
                    *OUTAGE_SETTINGS,
                    "INTERNAL_SEARCH_MAX_CONCURRENCY",
                    "WORKER_BATCH_SIZE",
                    "INTERNAL_SEARCH_CONNECT_TIMEOUT",
                    "INTERNAL_SEARCH_READ_TIMEOUT",
                    "RETRY_BACKOFF_MAX_SECONDS",
                ],
            )
            + f"; {rate:.0f} POSTs/s, searches 50 ms"
        )
        verdict.note(
            f"down {down_seconds:.0f} s from {lead:.0f} s in (refused, 503, hang {phase:.0f} s"
            f" each); received while down: {probes} probes (503 phase {in_503['metadata']},"
            f" hang phase {probes - in_503['metadata']}; at most {probes_allowed}),"
            f" {searches} searches (503 phase {in_503['match']}; at most {bound}), {others} other;"
            f" probes made by the scheduler {made} (at most {made_allowed});"
            f" breaker opened {opened}, closed {closed}"
        )
        verdict.note(
            f"recovery -> first COMPLETED {first:.1f} s, -> last COMPLETED {last:.1f} s"
            f" (at most 60; of the {len(backlog)} accepted before it {drained:.1f} s);"
            f" {len(ids)} accepted, attempts {dict(sorted(attempts.items()))}"
        )
        return verdict


NOISY_SETTINGS = {
    # A's 5,000 searches of 1 s go 100 at a time: A's backlog lasts the whole of B's 30 s.
    "WORKFLOW_IN_FLIGHT_MAX": "100",
    "INTERNAL_SEARCH_READ_TIMEOUT": "3",
}


def noisy_neighbour(quick: bool, broker: str = "redis", number: int = 24) -> Verdict:
    """Customer A posts 5 batches of 1,000 links whose searches take 1 s each; meanwhile
    customer B posts one link a second for 30 s, answered at once by the internal system. The
    fair rounds publish B's work within about a round of A's: B's 202 -> COMPLETED p99 <= 3 s,
    and everything of A's and B's ends COMPLETED. Prints B's p50/p99."""
    batches, items, b_seconds = (2, 500, 8) if quick else (5, 1000, 30)
    target = 3.0
    with Stack(f"s{number}", settings=NOISY_SETTINGS, broker=broker) as stack:
        a = stack.add_customer("Noisy A")
        b = stack.add_customer("Quiet B")
        # A's patients (Zed Nobody: no match) are searched in 1 s, B's (Jane Doe) at once.
        stack.control_standin("config", {"family_latency_ms": {"Nobody": 1000}})
        started = time.monotonic()
        a_posted = post_batch(stack, ["none"] * items, token=a.token)
        first_batch = time.monotonic() - started

        def more_batches() -> None:
            for _ in range(batches - 1):
                a_posted.extend(post_batch(stack, ["none"] * items, token=a.token))

        thread = _in_background(more_batches)
        b_posted = post_at_rate(
            stack, rate=1.0, seconds=b_seconds, tokens=[b.token], kinds=["certain"]
        )
        thread.join(120)
        a_ids, b_ids = accepted_ids(a_posted), accepted_ids(b_posted)
        verdict = check(
            stack,
            _label(number, "noisy neighbour", broker),
            a_posted + b_posted,
            deadline_seconds=150,
        )
        with stack.db() as conn:
            latencies = [
                float(seconds)
                for (seconds,) in conn.execute(
                    "SELECT extract(epoch FROM (t.at - w.created_at))"
                    " FROM workflows_workflow w JOIN workflows_workflowtransition t"
                    "  ON t.workflow_id = w.id AND t.target = 'COMPLETED'"
                    " WHERE w.id = ANY(%s::uuid[])",
                    [b_ids],
                ).fetchall()
            ]
            row = conn.execute(
                "SELECT extract(epoch FROM (SELECT max(created_at) FROM workflows_workflow"
                "  WHERE id = ANY(%s::uuid[]))),"
                " extract(epoch FROM (SELECT max(at) FROM workflows_workflowtransition"
                "  WHERE workflow_id = ANY(%s::uuid[]) AND target = 'COMPLETED')),"
                " extract(epoch FROM (SELECT min(created_at) FROM workflows_workflow"
                "  WHERE id = ANY(%s::uuid[])))",
                [b_ids, a_ids, a_ids],
            ).fetchone()
        b_last_202, a_last_end, a_first_202 = (
            float(x) if x is not None else 0.0 for x in row or (None,) * 3
        )
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        wrong = [p for p in a_posted + b_posted if p.status != 202]
        if len(latencies) != len(b_ids) or not b_ids or p99 > target:
            verdict.unexpected += 1
        if wrong:
            verdict.unexpected += len(wrong)
            verdict.note(f"answers other than 202: {dict(answers(wrong))}")
        # The test holds only if A's backlog outlived B's last request.
        if a_last_end <= b_last_202:
            verdict.unexpected += 1
            verdict.note("A's backlog was gone before B's last request: nothing was tested")
        verdict.note(
            _settings_note(stack, [*NOISY_SETTINGS, "WORKER_BATCH_SIZE"])
            + "; A's searches 1 s (stand-in family_latency_ms), B's at once; weights 1 and 1"
        )
        verdict.note(
            f"B: {len(b_ids)} links, 202 -> COMPLETED p50 {p50:.2f} s, p99 {p99:.2f} s"
            f" (target {target:.0f}), max {max(latencies, default=float('nan')):.2f} s;"
            f" A: {len(a_ids)} links in {batches} batches (the first accepted in"
            f" {first_batch:.1f} s), A's first 202 -> last COMPLETED"
            f" {a_last_end - a_first_202:.1f} s, {a_last_end - b_last_202:.1f} s after B's last"
            " 202"
        )
        return verdict


BACKLOG_SETTINGS = {
    "RECONCILE_STALE_AFTER_SECONDS": "5",
    "WORKFLOW_IN_FLIGHT_MAX": "400",
    # 20 batches of 1,000 in a few seconds: the batch rate limit is not under test.
    "RATE_LIMIT_LINK_BATCH": "",
}


def backlog(quick: bool, broker: str = "redis", number: int = 25) -> Verdict:
    """20,000 workflows accepted in batches of 1,000, the first half while the workers are
    stopped, the second while slow workers (searches of 100 ms, 2 task threads each) drain
    them, with a stale window of 5 s: the scheduler publishes under the bound on work in
    flight, so no message waits in the queue long enough to be taken back and published again.
    Prints the workflows published per workflow accepted (the workers'
    merchant_dispatcher_published_total, summed, over the workflows accepted), at most 1.1;
    all COMPLETED, none FAILED."""
    count, batch = (2000, 500) if quick else (20000, 1000)
    cap = 1.1
    with Stack(
        f"s{number}",
        settings=BACKLOG_SETTINGS,
        worker_concurrency=2,
        standin_latency_ms=100,
        broker=broker,
        worker_metrics=True,
    ) as stack:

        def accept(workflows: int) -> list[Posted]:
            with ThreadPoolExecutor(max_workers=2) as pool:
                batches = pool.map(
                    lambda _: post_batch(stack, ["certain", "none"] * (batch // 2)),
                    range(workflows // batch),
                )
                return [p for answered in batches for p in answered]

        for index in range(stack.celery_workers):
            stack.kill(f"worker{index}", signal.SIGTERM)  # no dispatcher, no consumer
        started = time.monotonic()
        posted = accept(count // 2)
        stopped_in = time.monotonic() - started
        drain_from = time.time()
        for index in range(stack.celery_workers):
            stack.start_worker(index)
        started = time.monotonic()
        posted += accept(count - count // 2)
        draining_in = time.monotonic() - started
        ids = accepted_ids(posted)
        verdict = check(stack, _label(number, "backlog", broker), posted, deadline_seconds=240)
        took, _ = _completed_since(stack, ids, drain_from)
        published = stack.worker_counter("merchant_dispatcher_published_total")
        recovered = stack.worker_counter("merchant_scheduler_recovered_total")
        with stack.db() as conn:
            (requeues, put_back) = conn.execute(
                "SELECT (SELECT coalesce(sum(requeues), 0) FROM workflows_workflow"
                "  WHERE id = ANY(%s::uuid[])),"
                " (SELECT count(*) FROM workflows_workflowtransition"
                "  WHERE workflow_id = ANY(%s::uuid[]) AND actor = 'worker'"
                "  AND source = target)",
                [ids, ids],
            ).fetchone() or (0, 0)
        per = _total(published) / len(ids) if ids else float("inf")
        searched = stack.standin_stats()["match_calls"]
        wrong = [p for p in posted if p.status != 202]
        if per > cap or len(ids) != count or wrong:
            verdict.unexpected += 1
        if stack.restarts:  # a worker's counter died with it: the count would be short
            verdict.unexpected += 1
            verdict.note("a worker restarted: its publications are not counted")
        if wrong:
            verdict.note(f"answers other than 202: {dict(answers(wrong))}")
        verdict.note(
            _settings_note(
                stack, [*BACKLOG_SETTINGS, "INTERNAL_SEARCH_MAX_CONCURRENCY", "WORKER_BATCH_SIZE"]
            )
            + "; searches 100 ms"
        )
        verdict.note(
            f"{len(ids)} accepted: {count // 2} in {stopped_in:.1f} s with the workers stopped,"
            f" the rest in {draining_in:.1f} s while they drained; workers start -> last"
            f" COMPLETED {took:.1f} s; published {_total(published)} workflow ids"
            f" ({ {name: round(value) for name, value in published.items()} })"
            f" = {per:.3f} per workflow (at most {cap});"
            f" taken back by the scheduler {_total(recovered)} (requeues {requeues}),"
            f" put back by workers {put_back}; searches received by the internal system"
            f" {searched}"
        )
        return verdict


SCENARIOS = [
    Scenario(1, "kill worker children", kill_worker_children),
    Scenario(2, "kill whole worker", kill_whole_worker),
    Scenario(3, "kill -9 Redis with a queue", kill_redis_with_queue),
    Scenario(4, "Redis paused", pause_redis),
    Scenario(5, "Redis restarted 5x", restart_redis_repeatedly),
    Scenario(6, "PostgreSQL restart", restart_postgres),
    Scenario(7, "same-key storm", same_key_storm),
    Scenario(8, "duplicated messages", duplicate_messages),
    Scenario(9, "hostile receiver", hostile_receiver),
    Scenario(10, "two beats", two_beats),
    Scenario(11, "flaky internal system", flaky_internal_system),
    Scenario(12, "kill worker mid-search", kill_worker_mid_search),
    # The broker faults again with RabbitMQ as the broker (its own node, tests/chaos/stack.py).
    Scenario(
        13,
        "RabbitMQ: kill worker children",
        partial(kill_worker_children, broker="rabbitmq", number=13),
    ),
    Scenario(
        14, "RabbitMQ: kill whole worker", partial(kill_whole_worker, broker="rabbitmq", number=14)
    ),
    Scenario(15, "RabbitMQ restarted", restart_rabbitmq),
    Scenario(
        16,
        "RabbitMQ: duplicated messages",
        partial(duplicate_messages, broker="rabbitmq", number=16),
    ),
    # The batched path (issue 18): batches split by a kill, and batches that overlap.
    Scenario(17, "kill worker mid-batch", kill_worker_mid_batch),
    Scenario(18, "overlapping batches", overlapping_batches),
    # Issue 32: crashes cost a lease, deploys nothing; timing settings at their defaults.
    Scenario(19, "crash mid-search", crash_mid_search),
    Scenario(20, "deploy mid-search", deploy_mid_search),
    Scenario(
        21,
        "RabbitMQ: crash mid-search",
        partial(crash_mid_search, broker="rabbitmq", number=21),
    ),
    Scenario(
        22,
        "RabbitMQ: deploy mid-search",
        partial(deploy_mid_search, broker="rabbitmq", number=22),
    ),
    # The schedule: an outage of the internal system, a noisy neighbour, a backlog.
    Scenario(23, "internal system down", outage),
    Scenario(24, "noisy neighbour", noisy_neighbour),
    Scenario(25, "backlog", backlog),
    Scenario(
        26,
        "RabbitMQ: internal system down",
        partial(outage, broker="rabbitmq", number=26),
    ),
    Scenario(
        27, "RabbitMQ: noisy neighbour", partial(noisy_neighbour, broker="rabbitmq", number=27)
    ),
    Scenario(28, "RabbitMQ: backlog", partial(backlog, broker="rabbitmq", number=28)),
]


def as_json(verdicts: list[Verdict]) -> str:
    return json.dumps([v.__dict__ | {"ok": v.ok} for v in verdicts], indent=2)
