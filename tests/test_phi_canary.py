"""PHI canary: a patient with unique demographics goes through every path in this process (the
ack path, the consumer run as a worker runs it, the sweep, the review, webhooks), then every
place data can end up is searched for those demographics: every log record of every logger at
DEBUG, the process's output, everything in the test Redis database (broker messages decoded),
the task messages and results, every response body, every webhook sent, every table of the
database except the request data, and the request data's own stored bytes (encrypted)."""

import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import requests
from celery.app.trace import build_tracer
from django.core.cache import cache
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from config.celery import app as celery_app
from linking import services as linking_services
from linking.models import LinkRequest
from linking.services import (
    link_review_resolve,
    request_data_purge_expired,
)
from linking.services.review import review_candidates, review_case_read
from linking.tasks import process_workflows
from merchant.models import Customer
from merchant.services import customer_onboard
from standin.receiver import ReceiverServer, make_receiver
from tests.conftest import broker_messages, every_logger_into
from tests.processes import serving
from workflows import tasks as workflow_tasks  # noqa: F401 -- registers deliver_webhooks
from workflows.dispatcher import Dispatcher
from workflows.models import Result, Status, WebhookDelivery, Workflow
from workflows.services import workflows_reconcile

pytestmark = pytest.mark.django_db(transaction=True)

# --- the canary ---------------------------------------------------------------------------------
NAME = "Quillonette Xandervoltz"
DOB = "1933-03-17"
CONTACT = {
    "address": "4187 Wyvernhollow Road, Zephyrtonville",
    "phone": "+1-555-8642-1379",
    "email": "q.cnryx7q9@example.org",
}
# Free-form: its keys are the customer's data as much as its values.
INSURANCE = {"payer": "Brackenfell Mutual", "member_id": "ZQX-90817263", "kq3ptrnl_plan": "gold"}
CANARIES = [
    "Quillonette",
    "Xandervoltz",
    DOB,
    "Wyvernhollow",
    "Zephyrtonville",
    "8642-1379",
    "86421379",
    "cnryx7q9",
    "Brackenfell",
    "ZQX-90817263",
    "90817263",
    "kq3ptrnl",
]
# What the request data itself must contain when decrypted (the search is not vacuous).
STORED_CANARIES = [c for c in CANARIES if c not in ("86421379", "90817263")]


def canary(**overrides: Any) -> dict[str, Any]:
    """A fresh canary patient (own id); the stand-in finds nobody with these demographics."""
    patient = {
        "id": str(uuid.uuid4()),
        "full_name": NAME,
        "dob": DOB,
        "contact": dict(CONTACT),
        "insurance": dict(INSURANCE),
    }
    patient.update(overrides)
    return {"patient": patient}


# The stand-in scores on name and birth date (and phone, email, address); canary contact and
# insurance change nothing for these two (standin/README.md "Scoring"):
JANE = {"full_name": "Jane Q Doe", "dob": "1980-04-02"}  # one `certain` candidate: linked
RIVERA = {"full_name": "Alex Rivera", "dob": "1975-09-14"}  # two `certain` at 0.97: review


# --- where to look ------------------------------------------------------------------------------
_BASE64ISH = re.compile(rb"[A-Za-z0-9+/_\-]{16,}={0,2}")


def _decoded(blob: bytes, depth: int = 0) -> Iterator[bytes]:
    """The blob and whatever base64 (and zlib) inside it decodes to: broker bodies, signed
    sessions and the like would hide a canary from a plain search."""
    yield blob
    if depth >= 2:
        return
    for match in _BASE64ISH.finditer(blob):
        chunk = match.group()
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(chunk + b"=" * (-len(chunk) % 4))
            except (binascii.Error, ValueError):
                continue
            with contextlib.suppress(zlib.error):
                raw = zlib.decompress(raw)
            yield from _decoded(raw, depth + 1)


def leaks(*blobs: str | bytes | None) -> set[str]:
    found: set[str] = set()
    for blob in blobs:
        if blob is None:
            continue
        data = blob.encode() if isinstance(blob, str) else blob
        for piece in _decoded(data):
            text = piece.decode("utf-8", "replace").casefold()
            found.update(c for c in CANARIES if c.casefold() in text)
    return found


def database_leaks(*, skip: Iterable[str] = ("linking_linkrequest",)) -> dict[str, set[str]]:
    """Every table (but `skip`), each row as PostgreSQL's text of the whole row."""
    found: dict[str, set[str]] = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        tables = sorted(name for (name,) in cursor.fetchall() if name not in set(skip))
        assert "workflows_webhookdelivery" in tables and "linking_auditevent" in tables
        for table in tables:
            cursor.execute(f"SELECT t::text FROM {connection.ops.quote_name(table)} t")  # noqa: S608
            hits = leaks(*(row for (row,) in cursor.fetchall()))
            if hits:
                found[table] = hits
    return found


def redis_leaks(client: redis.Redis) -> dict[str, set[str]]:
    """Every key of the test Redis database: the broker's queues and the cache."""
    found: dict[str, set[str]] = {}
    for key in client.scan_iter():
        kind = client.type(key)
        values: list[Any]
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        else:
            values = []
        hits = leaks(key, *values)
        if hits:
            found[key.decode()] = hits
    return found


@pytest.fixture
def all_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger at DEBUG, whatever LOGGING says (django.request is kept at
    ERROR there: a leak at DEBUG would still be a leak the day someone turns it up)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    with every_logger_into(handler):
        yield records


def log_text(record: logging.LogRecord) -> str:
    """The line any formatter could print, and every attribute a structured one could."""
    formatted = logging.Formatter("%(name)s %(levelname)s %(message)s").format(record)
    return formatted + repr(vars(record))


# --- the actors ---------------------------------------------------------------------------------


@dataclass
class RecordingClient:
    """A customer whose every answer is kept."""

    client: APIClient
    token: str
    answers: list[Any] = field(default_factory=list)

    def _keep(self, response: Any) -> Any:
        self.answers.append(response)
        return response

    def post(self, body: Any, key: str, *, raw: bool = False, path: str = "/link") -> Any:
        payload = body if raw else json.dumps(body)
        return self._keep(
            self.client.post(
                path,
                payload,
                content_type="application/json",
                HTTP_CUSTOMER_TOKEN=self.token,
                HTTP_IDEMPOTENCY_KEY=key,
            )
        )

    def get(self, path: str) -> Any:
        return self._keep(self.client.get(path, HTTP_CUSTOMER_TOKEN=self.token))

    def delete(self, path: str) -> Any:
        return self._keep(self.client.delete(path, HTTP_CUSTOMER_TOKEN=self.token))


class Worker:
    """Takes task messages off the Redis queue and runs them through Celery's own tracer, as a
    worker does: the same logging, and a retry is published to the broker like any message."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.taken: list[bytes] = []  # every message, raw, as the broker held it
        self.results: list[Any] = []
        self.tasks_run: list[tuple[str, list[Any], dict[str, Any]]] = []

    def wait(self, workflow: Workflow) -> None:
        """Until the workflow's own message is queued (the dispatcher publishes it just after
        the commit; another message, e.g. a webhook's, may be there first)."""
        deadline = time.monotonic() + 5
        while not any(
            m["task"] == process_workflows.name and str(workflow.id) in m["args"][0]
            for m in broker_messages(self.client)
        ):
            assert time.monotonic() < deadline, "the ack path published nothing"
            time.sleep(0.02)

    def run_all(self) -> None:
        for _ in range(50):
            raw = self.client.rpop("celery")
            if raw is None:
                return
            assert isinstance(raw, bytes)
            self.taken.append(raw)
            envelope = json.loads(raw)
            headers = envelope["headers"]
            args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            task = celery_app.tasks[headers["task"]]
            self.tasks_run.append((task.name, args, kwargs))
            tracer = build_tracer(task.name, task, app=celery_app, eager=False, propagate=False)
            request = {
                "id": headers["id"],
                "task": headers["task"],
                "retries": headers.get("retries", 0),
                "eta": headers.get("eta"),
                "hostname": "canary@localhost",
                "delivery_info": {"exchange": "", "routing_key": "celery"},
            }
            self.results.append(tracer(headers["id"], args, kwargs, request))
        raise AssertionError("the queue never drained")


def control(server: Any, action: str, body: dict[str, Any] | None = None) -> None:
    root = server.base_url.removesuffix("/fhir")
    requests.post(f"{root}/_control/{action}", json=body or {}, timeout=5).raise_for_status()


def script(server: Any, *steps: dict[str, Any]) -> None:
    control(server, "script", {"responses": list(steps)})


@pytest.fixture
def receiver() -> Iterator[ReceiverServer]:
    server = make_receiver("127.0.0.1", 0)
    with serving(server):
        yield server


@pytest.fixture
def customer(receiver: ReceiverServer) -> RecordingClient:
    credentials = customer_onboard(name="Harbour Clinics", webhook_url=f"{receiver.url}/hooks")
    receiver.state.secret = credentials.customer.webhook_secret
    return RecordingClient(APIClient(), credentials.token)


def workflow_of(response: Any) -> Workflow:
    assert response.status_code == 202, response.content
    return Workflow.objects.get(id=response.json()["workflow-id"])


# --- the test -----------------------------------------------------------------------------------


def test_a_canary_patient_leaves_no_trace(
    dispatcher: Dispatcher,
    customer: RecordingClient,
    standin: Any,
    receiver: ReceiverServer,
    redis_db: redis.Redis,
    all_logs: list[logging.LogRecord],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
) -> None:
    settings.WORKFLOW_MAX_ATTEMPTS = 5
    worker = Worker(redis_db)
    ended: dict[str, Workflow] = {}

    # 1. Success: Jane's name and birth date (what the match needs), canary everything else.
    body = canary(**JANE)
    linked = workflow_of(customer.post(body, "success"))
    worker.wait(linked)
    worker.run_all()
    ended["success"] = linked
    patient_id = body["patient"]["id"]
    assert customer.post(body, "success-again").status_code == 409  # already linked
    assert customer.get(f"/patient/{patient_id}").status_code == 200
    assert customer.delete(f"/link/{patient_id}?reason=merged").status_code == 200

    # 2. No match.
    ended["no match"] = workflow_of(customer.post(canary(), "no-match"))
    worker.wait(ended["no match"])
    worker.run_all()

    # 3. Permanent failure of the internal search.
    ended["permanent failure"] = workflow_of(customer.post(canary(), "permanent"))
    worker.wait(ended["permanent failure"])
    script(standin, {"status": 400})
    worker.run_all()

    # 4. Transient failure: put back due after its backoff, published again then, and ended.
    ended["retry"] = workflow_of(customer.post(canary(), "transient"))
    worker.wait(ended["retry"])
    script(standin, {"status": 500})
    worker.run_all()
    worker.wait(ended["retry"])
    worker.run_all()

    # 5. A crash in the consumer: the worker logs it; the scheduler takes it back after the
    #    lease.
    crashed = workflow_of(customer.post(canary(), "crash"))
    worker.wait(crashed)

    def explode(patient: Any) -> Any:
        raise RuntimeError("internal search client crashed")

    monkeypatch.setattr("linking.services.process.internal_search_match", explode)
    worker.run_all()
    monkeypatch.undo()
    assert Workflow.objects.get(id=crashed.id).status == Status.IN_PROGRESS
    Workflow.objects.filter(id=crashed.id).update(claimed_until=timezone.now())
    worker.wait(crashed)
    worker.run_all()
    ended["crash"] = crashed

    # 6. The review band: an operator reads both sides (audited) and links.
    body = canary(**RIVERA)
    review = workflow_of(customer.post(body, "review"))
    worker.wait(review)
    worker.run_all()
    assert Workflow.objects.get(id=review.id).status == Status.REVIEW
    assert customer.post(body, "review-again").status_code == 409  # in progress
    case = review_case_read(workflow=review, actor="operator:ops")
    assert case.request is not None and case.request["contact"] == CONTACT
    link_review_resolve(
        workflow_id=review.id,
        internal_patient_id=review_candidates(workflow_id=review.id)[0].internal_patient_id,
        actor="operator:ops",
        reason="confirmed with the clinic",
    )
    worker.run_all()
    ended["review"] = review

    # 7. An asynchronous search: the job is accepted (REQUESTED), then polled by the sweep's run.
    settings.INTERNAL_SEARCH_ASYNC = True
    polled = workflow_of(customer.post(canary(), "async"))
    worker.wait(polled)
    worker.run_all()
    assert Workflow.objects.get(id=polled.id).status == Status.REQUESTED
    control(standin, "complete-jobs")
    assert polled.id in workflows_reconcile(stale_after_seconds=0).requeued
    worker.wait(polled)
    worker.run_all()
    settings.INTERNAL_SEARCH_ASYNC = False
    ended["asynchronous search"] = polled

    # 8. Refused requests: validation (400), too thin (422), key reuse (422), too large (413),
    #    malformed JSON (400), no token (401), and a crash of the ack path (500).
    refused = [
        (canary(contact={**CONTACT, "phone": "Wyvernhollow 86421379"}), 400),
        (canary(contact={**CONTACT, "email": "cnryx7q9@@Zephyrtonville"}), 400),
        (canary(dob=DOB + "x"), 400),
        (canary(full_name=DOB), 400),
        (canary(full_name="Quillonette\x07Xandervoltz"), 400),
        (canary(full_name="Xandervoltz" * 20), 400),
        (canary(insurance="ZQX-90817263"), 400),
        (canary(full_name="Xandervoltz", contact={}, insurance={}), 422),
        (canary(full_name="Quillonette Brackenfell"), 422),  # key "no-match" reused below
    ]
    for index, (bad, status) in enumerate(refused):
        key = "no-match" if index == len(refused) - 1 else f"refused-{index}"
        assert customer.post(bad, key).status_code == status
    too_large = canary(insurance={"kq3ptrnl_note": "Wyvernhollow " * 6000})
    assert customer.post(too_large, "large").status_code == 413
    malformed = json.dumps(canary())[:-3]
    assert customer.post(malformed, "malformed", raw=True).status_code == 400
    anonymous = customer.client.post("/link", canary(), format="json", HTTP_IDEMPOTENCY_KEY="a")
    customer.answers.append(anonymous)
    assert anonymous.status_code == 401

    def ack_crash(**kwargs: Any) -> Any:
        raise RuntimeError("ack path crashed")

    monkeypatch.setattr(linking_services, "link_accept", ack_crash)
    assert customer.post(canary(), "ack-crash").status_code == 500
    monkeypatch.undo()

    # 9. A batch: one item accepted and processed, the others refused each with its problem
    #    (the answer is kept for replay and GET /link/batch: nothing of the items in it).
    batch_items = [
        {"idempotency-key": "batch-ok", **canary()},
        {"idempotency-key": "batch-bad", **canary(dob=DOB + "x")},
        {"idempotency-key": "batch-thin", **canary(full_name="Xandervoltz", contact={})},
        {"idempotency-key": "batch-bad-phone", **refused[0][0]},
    ]
    batch = customer.post({"requests": batch_items}, "batch", path="/link/batch")
    assert (batch.status_code, batch.json()["accepted"], batch.json()["refused"]) == (202, 1, 3)
    ended["batch item"] = Workflow.objects.get(id=batch.json()["items"][0]["workflow-id"])
    worker.wait(ended["batch item"])
    worker.run_all()
    assert customer.get(f"/link/batch/{batch.json()['batch-id']}").status_code == 200

    # Every workflow's status, as the customer reads it.
    for workflow in ended.values():
        assert customer.get(f"/link/status/{workflow.id}").status_code == 200

    # --- the paths did happen ------------------------------------------------------------------
    outcomes = {
        name: (w.status, w.result, w.attempts)
        for name, w in ((n, Workflow.objects.get(id=w.id)) for n, w in ended.items())
    }
    assert outcomes["success"][:2] == (Status.COMPLETED, Result.LINKED)
    assert outcomes["no match"][:2] == (Status.COMPLETED, Result.NO_RESULTS)
    assert outcomes["permanent failure"][0] == Status.FAILED
    assert outcomes["retry"] == (Status.COMPLETED, Result.NO_RESULTS, 2)
    assert outcomes["crash"] == (Status.COMPLETED, Result.NO_RESULTS, 2)
    assert outcomes["review"][:2] == (Status.COMPLETED, Result.LINKED)
    assert outcomes["asynchronous search"][:2] == (Status.COMPLETED, Result.NO_RESULTS)
    assert outcomes["batch item"][:2] == (Status.COMPLETED, Result.NO_RESULTS)
    retried = str(ended["retry"].id)
    assert (
        sum(
            1
            for name, args, _kwargs in worker.tasks_run
            if name == process_workflows.name and retried in args[0]
        )
        == 2
    ), "the retry did not go through the broker once more"
    crash_logs = [r for r in all_logs if r.exc_info and "internal search client" in log_text(r)]
    assert crash_logs, "the worker's crash was not logged (or not captured)"
    deliveries = list(WebhookDelivery.objects.all())
    types = {d.event_type for d in deliveries}
    assert {"link.completed", "link.failed", "link.delinked"} <= types
    assert len(receiver.deliveries()) == len(deliveries)
    assert all(d.verified for d in receiver.deliveries())

    # --- the request data: encrypted, and truly the canary's -----------------------------------
    with connection.cursor() as cursor:
        cursor.execute("SELECT t::text FROM linking_linkrequest t")
        stored = [row for (row,) in cursor.fetchall()]
    assert len(stored) == 8  # every accepted request (refused ones store nothing)
    assert leaks(*stored) == set()
    decrypted = json.dumps([r.data for r in LinkRequest.objects.all()])
    assert all(c in decrypted for c in STORED_CANARIES)

    # --- and nowhere else ----------------------------------------------------------------------
    assert database_leaks() == {}
    assert redis_leaks(redis_db) == {}
    assert leaks(*worker.taken) == set(), "a task message"
    assert leaks(*(json.dumps([a, k]) for _n, a, k in worker.tasks_run)) == set()
    assert leaks(*(repr(result) for result in worker.results)) == set(), "a task result"
    for answer in customer.answers:
        assert leaks(answer.content, repr(sorted(answer.items()))) == set(), answer.content
    for delivery in receiver.deliveries():
        assert leaks(delivery.body, repr(delivery.headers), delivery.path) == set()
    logged = {r.name: leaks(log_text(r)) for r in all_logs}
    assert {name: hits for name, hits in logged.items() if hits} == {}
    output = capsys.readouterr()
    assert leaks(output.out, output.err) == set()

    # Once the workflows have ended and the retention passed, the data itself is gone.
    later = timezone.now() + dt.timedelta(days=settings.REQUEST_DATA_RETENTION_DAYS + 1)
    assert request_data_purge_expired(now=later) == 8
    assert database_leaks(skip=()) == {}


def test_the_search_finds_a_planted_canary(
    redis_db: redis.Redis, all_logs: list[logging.LogRecord], credentials: Any
) -> None:
    """The searches above can fail: each finds a canary hidden where a leak would be."""
    Customer.objects.filter(id=credentials.customer.id).update(name="Xandervoltz Clinic")
    assert database_leaks() == {"merchant_customer": {"Xandervoltz"}}

    cache.set("status:planted", {"address": CONTACT["address"]})  # pickled by the cache
    process_workflows.apply_async(args=(["q.cnryx7q9"],))  # base64 in the broker
    found = redis_leaks(redis_db)
    assert {"Wyvernhollow", "Zephyrtonville"} <= set().union(*found.values())
    assert found.get("celery") == {"cnryx7q9"}

    logging.getLogger("django.request").debug("seen %s", INSURANCE["member_id"])
    assert any(leaks(log_text(r)) == {"ZQX-90817263", "90817263"} for r in all_logs)

    request = LinkRequest.objects.create(
        request_id=uuid.uuid4(), customer=credentials.customer, data=canary()
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE linking_linkrequest SET data = %s WHERE request_id = %s",
            [json.dumps(canary()), request.request_id],
        )
    assert "linking_linkrequest" in database_leaks(skip=())
