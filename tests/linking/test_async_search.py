"""Asynchronous internal search (docs/internal-search-contract.md section 2): the `$match` job
client, the consumer's REQUESTED state and its polls, the signed result callback, and the
exactly-once effect of a callback racing a poll of the same job.

Real PostgreSQL, the real stand-in over HTTP on an ephemeral 127.0.0.1 port, no mocks of our own
code. The stand-in's jobs stay pending until /_control/complete-jobs unless a test says otherwise.
"""

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from django.db import connection
from django.test import Client
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from linking.internal_search import (
    MATCH_GRADE_URL,
    Candidate,
    InternalSearchError,
    SearchJobLost,
    SearchRequested,
    internal_search_match,
    internal_search_poll,
    job_url,
)
from linking.models import LinkHistory, PatientMapping, SearchCallback, SearchCandidate
from linking.services import (
    ProcessOutcome,
    SearchUnknown,
    link_process,
    link_search_result,
    search_callbacks_purge,
)
from standin.server import StandinServer, make_server
from tests.conftest import LinkClient, link_body
from tests.linking.test_internal_search import (
    JANE_DOE_ID,
    RIVERA_IDS,
    Canned,
    CannedServer,
    control,
    patient,
)
from tests.processes import free_port, serving
from workflows.models import Result, Status, WebhookDelivery, Workflow, WorkflowTransition

pytestmark = pytest.mark.django_db

JOB_ID = re.compile(r"[0-9a-f]{32}")
PROBLEM_JSON = "application/problem+json"
WORKER = "worker"
CALLBACK = "search-callback"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET = new_secret()


@pytest.fixture(autouse=True)
def async_settings(settings: Any) -> None:
    settings.INTERNAL_SEARCH_ASYNC = True
    settings.INTERNAL_CALLBACK_SECRET = SECRET
    settings.INTERNAL_SEARCH_TOKEN = ""
    settings.INTERNAL_SEARCH_READ_TIMEOUT = 3.0
    settings.INTERNAL_SEARCH_CONNECT_TIMEOUT = 1.0


@pytest.fixture
def standin(settings: Any) -> Iterator[StandinServer]:
    """The stand-in, its jobs pending until /_control/complete-jobs, sending no callback."""
    server = make_server("127.0.0.1", 0, async_delay_ms=-1)
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        yield server


@pytest.fixture
def canned(settings: Any) -> Iterator[Canned]:
    """A server answering one fixed response, recording what it was sent (answers the stand-in
    cannot give: a 202 without Content-Location, a 410...)."""
    answer = Canned()
    server = CannedServer(answer)
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        yield answer


# --- helpers -------------------------------------------------------------------------------------


def stats(server: StandinServer) -> dict[str, Any]:
    result: dict[str, Any] = control(server, "stats")
    return result


def fhir_requests(server: StandinServer) -> list[tuple[str, str, int]]:
    return [(r["method"], r["path"], r["status"]) for r in stats(server)["requests"]]


def accept(api: LinkClient, body: dict[str, Any] | None = None) -> str:
    response = api.post_link(body or link_body(), key=uuid.uuid4().hex)
    assert response.status_code == 202, response.content
    workflow_id: str = response.json()["workflow-id"]
    return workflow_id


def requested(api: LinkClient, body: dict[str, Any] | None = None) -> Workflow:
    """A workflow whose search the internal system took as a job (first attempt done)."""
    workflow_id = accept(api, body)
    assert link_process(workflow_id=workflow_id).retry_in is None
    workflow = Workflow.objects.get(id=workflow_id)
    assert workflow.status == Status.REQUESTED
    assert workflow.search_id
    return workflow


def job_bundle(server: StandinServer, search_id: str) -> bytes:
    """Complete the stand-in's jobs and read this one's Bundle, byte for byte (as a callback
    would carry it)."""
    control(server, "complete-jobs")
    response = requests.get(job_url(search_id), timeout=5)
    assert response.status_code == 200
    return response.content


def signed(
    body: bytes,
    *,
    secret: str = SECRET,
    msg_id: str | None = None,
    at: dt.datetime | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers for `body`, as the internal system sends them."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or dt.datetime.now(dt.UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


def raw_signature(body: bytes, msg_id: str, timestamp: int, secret: str = SECRET) -> str:
    """The scheme's HMAC over raw bytes (what a signer does with a body that is not UTF-8)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def post_callback(
    search_id: str, body: bytes, headers: dict[str, str], client: Client | None = None
) -> Any:
    return (client or Client()).post(
        f"/internal/search-results/{search_id}",
        body,
        content_type="application/fhir+json",
        headers=headers,
    )


def effects(workflow_id: Any) -> dict[str, Any]:
    """Everything a search result can change, to show that a refused one changed nothing."""
    workflow = Workflow.objects.get(id=workflow_id)
    return {
        "status": workflow.status,
        "result": workflow.result,
        "reason": workflow.reason,
        "search_id": workflow.search_id,
        "attempts": workflow.attempts,
        "claim_id": workflow.claim_id,
        "updated_at": workflow.updated_at,
        "transitions": list(
            WorkflowTransition.objects.filter(workflow_id=workflow_id).values_list("id", flat=True)
        ),
        "mappings": PatientMapping.objects.count(),
        "history": LinkHistory.objects.count(),
        "candidates": SearchCandidate.objects.count(),
        "deliveries": WebhookDelivery.objects.count(),
    }


def timeline(workflow_id: Any) -> list[tuple[str, str, str]]:
    return [
        (t.source, t.target, t.actor)
        for t in WorkflowTransition.objects.filter(workflow_id=workflow_id)
    ]


def stored_candidates(workflow_id: Any) -> list[tuple[int, str, float, str]]:
    return [
        (c.rank, c.internal_patient_id, c.score, c.match_grade)
        for c in SearchCandidate.objects.filter(workflow_id=workflow_id).order_by("rank")
    ]


def assert_problem(response: Any, status: int, slug: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM_JSON
    assert response.json()["type"] == f"/problems/{slug}"


def searchset(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def entry(patient_id: str, score: float = 0.97, grade: Any = "certain") -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Patient", "id": patient_id},
        "search": {
            "mode": "match",
            "score": score,
            "extension": [{"url": MATCH_GRADE_URL, "valueCode": grade}],
        },
    }


# --- 1. the client: job, poll, Prefer ----------------------------------------------------------


def test_async_match_returns_the_job_named_by_content_location(standin):
    answer = internal_search_match(patient())
    assert isinstance(answer, SearchRequested)
    assert JOB_ID.fullmatch(answer.search_id)
    assert fhir_requests(standin) == [("POST", "/fhir/Patient/$match", 202)]
    # The id is the stand-in's own job: its job URL knows it (an unknown id would be a 404).
    assert internal_search_poll(answer.search_id) is None
    assert stats(standin)["job_polls"] == 1


def test_sync_mode_against_the_same_server_gets_candidates(standin, settings):
    settings.INTERNAL_SEARCH_ASYNC = False
    assert internal_search_match(patient()) == [Candidate(JANE_DOE_ID, 0.99, "certain")]
    assert fhir_requests(standin) == [("POST", "/fhir/Patient/$match", 200)]


def test_poll_pending_then_done_then_unknown(standin):
    answer = internal_search_match(patient())
    assert isinstance(answer, SearchRequested)
    assert internal_search_poll(answer.search_id) is None
    assert internal_search_poll(answer.search_id) is None
    assert control(standin, "complete-jobs") == {"completed": 1}
    assert internal_search_poll(answer.search_id) == [Candidate(JANE_DOE_ID, 0.99, "certain")]
    # Done stays done: polling again gives the same answer.
    assert internal_search_poll(answer.search_id) == [Candidate(JANE_DOE_ID, 0.99, "certain")]
    with pytest.raises(SearchJobLost) as caught:
        internal_search_poll(uuid.uuid4().hex)
    assert isinstance(caught.value, InternalSearchError)
    assert caught.value.permanent is False
    path = f"/fhir/$match-jobs/{answer.search_id}"
    assert [r[2] for r in fhir_requests(standin) if r[1] == path] == [202, 202, 200, 200]
    assert stats(standin)["match_calls"] == 1


def test_poll_of_a_no_match_job_is_an_empty_list(standin):
    answer = internal_search_match(patient(full_name="Zed Nobody", dob="1901-01-01"))
    assert isinstance(answer, SearchRequested)
    control(standin, "complete-jobs")
    assert internal_search_poll(answer.search_id) == []


@pytest.mark.parametrize("is_async", [True, False])
def test_prefer_header_is_sent_only_in_async_mode(canned, settings, is_async):
    settings.INTERNAL_SEARCH_ASYNC = is_async
    # A server may ignore Prefer and answer at once: candidates, in either mode.
    canned.body = json.dumps(searchset(entry("abc"))).encode()
    assert internal_search_match(patient()) == [Candidate("abc", 0.97, "certain")]
    [seen] = canned.seen
    assert seen.headers.get("prefer") == ("respond-async" if is_async else None)


def test_job_polls_carry_no_prefer_header(canned):
    canned.status = 202
    assert internal_search_poll("abc") is None
    [seen] = canned.seen
    assert "prefer" not in seen.headers
    assert seen.path == "/fhir/$match-jobs/abc"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Content-Location": ""}, {"Content-Location": "/fhir/$match-jobs/"}],
    ids=["absent", "empty", "no-id"],
)
def test_202_without_a_usable_content_location_is_permanent(canned, headers):
    canned.status = 202
    canned.headers = headers
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True
    assert "Content-Location" in caught.value.reason


def test_job_url_is_ours_never_the_content_locations_host(canned, settings):
    canned.status = 202
    canned.headers = {"Content-Location": "https://jobs.elsewhere.example/queue/abc-123"}
    answer = internal_search_match(patient())
    assert answer == SearchRequested("abc-123")
    assert job_url("abc-123") == f"{settings.INTERNAL_SEARCH_URL}/$match-jobs/abc-123"
    assert internal_search_poll("abc-123") is None
    assert [s.path for s in canned.seen] == ["/fhir/Patient/$match", "/fhir/$match-jobs/abc-123"]


@pytest.mark.parametrize("dots", ["..", "."])
def test_dot_segment_search_ids_are_refused(canned, dots):
    # requests would normalise /$match-jobs/.. to {base}/: not the job's URL.
    canned.status = 202
    canned.headers = {"Content-Location": f"http://internal.example/fhir/$match-jobs/{dots}"}
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True


@pytest.mark.parametrize("status", [404, 410])
def test_job_gone_is_lost(canned, status):
    canned.status = status
    with pytest.raises(SearchJobLost):
        internal_search_poll("abc")


@pytest.mark.parametrize(
    ("status", "body", "permanent"),
    [
        (500, b"", False),
        (503, b"", False),
        (429, b"", False),
        (400, b"", True),
        (403, b"", True),
        (302, b"", True),
        (201, b"", True),
        (200, b"<html>not a bundle</html>", True),
        (200, b'{"resourceType": "OperationOutcome"}', True),
    ],
)
def test_poll_errors_are_classified(canned, status, body, permanent):
    canned.status = status
    canned.body = body
    if status == 302:
        canned.headers = {"Location": "/elsewhere"}
    with pytest.raises(InternalSearchError) as caught:
        internal_search_poll("abc")
    assert not isinstance(caught.value, SearchJobLost)
    assert caught.value.permanent is permanent
    assert len(canned.seen) == 1  # a redirect is not followed


# --- 2. link_process in async mode ---------------------------------------------------------------


def test_async_search_waits_in_requested_and_a_later_poll_links(api: LinkClient, standin):
    body = link_body()
    workflow_id = accept(api, body)

    assert link_process(workflow_id=workflow_id).retry_in is None
    workflow = Workflow.objects.get(id=workflow_id)
    assert (workflow.status, workflow.result, workflow.attempts) == (Status.REQUESTED, None, 1)
    assert workflow.search_id is not None and JOB_ID.fullmatch(workflow.search_id)
    assert (workflow.claim_id, workflow.claimed_until) == (None, None)
    assert timeline(workflow_id)[1:] == [
        (Status.RECEIVED, Status.IN_PROGRESS, WORKER),
        (Status.IN_PROGRESS, Status.REQUESTED, WORKER),
    ]
    reasons = WorkflowTransition.objects.filter(workflow_id=workflow_id).values_list(
        "reason", flat=True
    )
    assert list(reasons)[-1] == "asynchronous search accepted"
    assert not PatientMapping.objects.exists()
    assert not SearchCandidate.objects.exists()
    assert not WebhookDelivery.objects.exists()
    assert fhir_requests(standin) == [("POST", "/fhir/Patient/$match", 202)]
    search_id = workflow.search_id

    # The sweep re-queues it: a poll while the job is pending changes nothing but the attempt.
    before = effects(workflow_id)
    assert link_process(workflow_id=workflow_id).retry_in is None
    workflow.refresh_from_db()
    assert (workflow.status, workflow.search_id, workflow.attempts) == (
        Status.REQUESTED,
        search_id,
        2,
    )
    assert (workflow.claim_id, workflow.claimed_until) == (None, None)
    after = effects(workflow_id)
    assert {k: v for k, v in after.items() if k not in ("attempts", "updated_at")} == {
        k: v for k, v in before.items() if k not in ("attempts", "updated_at")
    }
    assert stats(standin)["job_polls"] == 1
    assert stats(standin)["match_calls"] == 1  # polled, not searched again

    # The job completes; the next poll links.
    assert control(standin, "complete-jobs") == {"completed": 1}
    assert link_process(workflow_id=workflow_id).retry_in is None
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    assert timeline(workflow_id)[3:] == [
        (Status.REQUESTED, Status.LINKED, WORKER),
        (Status.LINKED, Status.COMPLETED, WORKER),
    ]
    mapping = PatientMapping.objects.get()
    assert mapping.workflow_id == workflow.id
    assert str(mapping.customer_patient_id) == body["patient"]["id"]
    assert (mapping.internal_patient_id, mapping.score, mapping.match_grade) == (
        JANE_DOE_ID,
        0.99,
        "certain",
    )
    assert stored_candidates(workflow_id) == [(1, JANE_DOE_ID, 0.99, "certain")]
    assert SearchCandidate.objects.get().attempt == 3
    delivery = WebhookDelivery.objects.get()
    assert delivery.workflow_id == workflow.id
    assert delivery.event_type == "link.completed"
    assert json.loads(delivery.payload)["data"]["result"] == "LINKED"
    assert (stats(standin)["match_calls"], stats(standin)["job_polls"]) == (1, 2)

    # A late duplicate message finds it finished: no poll, nothing new.
    finished = effects(workflow_id)
    assert link_process(workflow_id=workflow_id).retry_in is None
    assert effects(workflow_id) == finished
    assert stats(standin)["job_polls"] == 2


def test_a_lost_job_is_searched_again(api: LinkClient, standin):
    workflow = requested(api)
    first = workflow.search_id
    control(standin, "reset")  # the internal system forgot its jobs (config stays: pending)

    assert link_process(workflow_id=workflow.id).retry_in is None
    workflow.refresh_from_db()
    assert workflow.status == Status.REQUESTED
    assert workflow.search_id is not None and JOB_ID.fullmatch(workflow.search_id)
    assert workflow.search_id != first
    assert (workflow.claim_id, workflow.attempts) == (None, 2)
    assert timeline(workflow.id)[-1] == (Status.REQUESTED, Status.REQUESTED, WORKER)
    assert fhir_requests(standin) == [
        ("GET", f"/fhir/$match-jobs/{first}", 404),
        ("POST", "/fhir/Patient/$match", 202),
    ]
    # The forgotten job's id no longer names the workflow.
    with pytest.raises(SearchUnknown):
        link_search_result(search_id=str(first), candidates=[])

    control(standin, "complete-jobs")
    assert link_process(workflow_id=workflow.id).retry_in is None
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    assert PatientMapping.objects.get().internal_patient_id == JANE_DOE_ID
    assert WebhookDelivery.objects.count() == 1


def test_a_lost_job_searched_again_in_sync_mode_links_at_once(api: LinkClient, standin, settings):
    workflow = requested(api)
    control(standin, "reset")
    settings.INTERNAL_SEARCH_ASYNC = False  # switched off meanwhile
    link_process(workflow_id=workflow.id)
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    assert [r[2] for r in fhir_requests(standin)] == [404, 200]


def test_an_unreachable_job_url_is_retried_after_its_backoff(api: LinkClient, standin, settings):
    workflow = requested(api)
    settings.INTERNAL_SEARCH_URL = f"http://127.0.0.1:{free_port()}/fhir"  # connection refused
    outcome = link_process(workflow_id=workflow.id)
    assert outcome.retry_in is not None
    workflow.refresh_from_db()
    assert workflow.status == Status.REQUESTED
    # Back on the schedule, due after its backoff; no claim held meanwhile.
    assert workflow.claim_id is None and workflow.published_at is None
    assert workflow.due_at is not None and workflow.due_at > timezone.now()


def test_a_202_without_content_location_fails_the_workflow(api: LinkClient, canned):
    canned.status = 202
    workflow_id = accept(api)
    link_process(workflow_id=workflow_id)
    workflow = Workflow.objects.get(id=workflow_id)
    assert workflow.status == Status.FAILED
    assert "Content-Location" in workflow.reason
    assert workflow.search_id is None
    assert WebhookDelivery.objects.get().event_type == "link.failed"


# --- 3. the three bands, by poll and by callback -------------------------------------------------


@pytest.mark.parametrize("route", ["poll", "callback"])
@pytest.mark.parametrize(
    ("demographics", "status", "result", "candidate_ids"),
    [
        ({}, Status.COMPLETED, Result.LINKED, [JANE_DOE_ID]),
        ({"full_name": "Alex Rivera", "dob": "1975-09-14"}, Status.REVIEW, None, RIVERA_IDS),
        ({"full_name": "Zed Nobody", "dob": "1901-01-01"}, Status.COMPLETED, Result.NO_RESULTS, []),
    ],
    ids=["one-certain", "two-certain", "none"],
)
def test_each_band_through_an_async_search(
    api: LinkClient, standin, route, demographics, status, result, candidate_ids
):
    workflow = requested(api, link_body(**demographics))
    if route == "poll":
        control(standin, "complete-jobs")
        link_process(workflow_id=workflow.id)
        actor = WORKER
    else:
        body = job_bundle(standin, str(workflow.search_id))
        response = post_callback(str(workflow.search_id), body, signed(body))
        assert response.status_code == 200
        assert response.json() == {
            "workflow-id": str(workflow.id),
            "applied": True,
            "status": status,
        }
        actor = CALLBACK
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (status, result)
    assert [c[1] for c in stored_candidates(workflow.id)] == candidate_ids
    decided = timeline(workflow.id)[3]
    assert decided[0] == Status.REQUESTED and decided[2] == actor
    if result == Result.LINKED:
        assert PatientMapping.objects.get().internal_patient_id == JANE_DOE_ID
        assert WebhookDelivery.objects.get().event_type == "link.completed"
    else:
        assert not PatientMapping.objects.exists()
    if status == Status.REVIEW:
        # An operator's now: no customer webhook yet, nobody holds it, no result.
        assert not WebhookDelivery.objects.exists()
        assert (workflow.claim_id, workflow.claimed_until) == (None, None)
        assert decided[1] == Status.REVIEW
        assert all(c[3] == "certain" and c[2] == 0.97 for c in stored_candidates(workflow.id))
    if result == Result.NO_RESULTS:
        assert workflow.reason == "no match"
        payload = json.loads(WebhookDelivery.objects.get().payload)
        assert payload["data"]["result"] == "NO_RESULTS"


# --- 4. the callback API -------------------------------------------------------------------------


@pytest.fixture
def waiting(api: LinkClient, standin: StandinServer) -> tuple[Workflow, bytes]:
    """A REQUESTED workflow whose job is done, and the Bundle its callback carries."""
    workflow = requested(api)
    return workflow, job_bundle(standin, str(workflow.search_id))


def test_signed_callback_applies_once(waiting, standin):
    workflow, body = waiting
    search_id = str(workflow.search_id)
    headers = signed(body)
    polls = stats(standin)["job_polls"]

    response = post_callback(search_id, body, headers)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "workflow-id": str(workflow.id),
        "applied": True,
        "status": "COMPLETED",
    }
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    assert timeline(workflow.id)[3:] == [
        (Status.REQUESTED, Status.LINKED, CALLBACK),
        (Status.LINKED, Status.COMPLETED, CALLBACK),
    ]
    mapping = PatientMapping.objects.get()
    assert (mapping.workflow_id, mapping.internal_patient_id) == (workflow.id, JANE_DOE_ID)
    assert LinkHistory.objects.get().actor == CALLBACK
    assert stored_candidates(workflow.id) == [(1, JANE_DOE_ID, 0.99, "certain")]
    assert WebhookDelivery.objects.get().event_type == "link.completed"
    applied = effects(workflow.id)

    # The same delivery again (a retry of the internal system), then a fresh one: acknowledged,
    # nothing new.
    for again in (headers, signed(body)):
        response = post_callback(search_id, body, again)
        assert response.status_code == 200
        assert response.json() == {
            "workflow-id": str(workflow.id),
            "applied": False,
            "status": "COMPLETED",
        }
        assert effects(workflow.id) == applied
    # The sweep's poll that comes after: no call to the internal system, nothing new.
    link_process(workflow_id=workflow.id)
    assert effects(workflow.id) == applied
    assert stats(standin)["job_polls"] == polls


def test_callback_after_the_poll_won_is_acknowledged_and_ignored(waiting):
    workflow, body = waiting
    link_process(workflow_id=workflow.id)
    polled = effects(workflow.id)
    assert polled["status"] == Status.COMPLETED
    response = post_callback(str(workflow.search_id), body, signed(body))
    assert response.status_code == 200
    assert response.json() == {
        "workflow-id": str(workflow.id),
        "applied": False,
        "status": "COMPLETED",
    }
    assert effects(workflow.id) == polled
    assert LinkHistory.objects.get().actor == WORKER


def test_a_result_for_a_workflow_in_review_is_ignored(api: LinkClient, standin):
    workflow = requested(api, link_body(full_name="Alex Rivera", dob="1975-09-14"))
    body = job_bundle(standin, str(workflow.search_id))
    link_process(workflow_id=workflow.id)  # the poll sends it to review
    in_review = effects(workflow.id)
    assert in_review["status"] == Status.REVIEW
    # A late callback (say, one naming a single candidate) must not overtake the operator.
    jane = json.dumps(searchset(entry(JANE_DOE_ID, 0.99))).encode()
    for late in (body, jane):
        response = post_callback(str(workflow.search_id), late, signed(late))
        assert response.status_code == 200
        assert response.json() == {
            "workflow-id": str(workflow.id),
            "applied": False,
            "status": "REVIEW",
        }
    # Nor may a re-queued message: REVIEW is not the consumer's.
    link_process(workflow_id=workflow.id)
    assert effects(workflow.id) == in_review


Forgery = Callable[[bytes], tuple[bytes, dict[str, str]]]


def _without(name: str) -> Forgery:
    return lambda body: (body, {k: v for k, v in signed(body).items() if k != name})


def _signature(value: str) -> Forgery:
    return lambda body: (body, {**signed(body), "webhook-signature": value})


def _tampered(body: bytes) -> tuple[bytes, dict[str, str]]:
    # Signed by us, then the candidate swapped in transit.
    return body.replace(JANE_DOE_ID.encode(), RIVERA_IDS[0].encode()), signed(body)


def _other_msg_id(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, {**signed(body, msg_id="msg_a"), "webhook-id": "msg_b"}


def _other_timestamp(body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed(body)
    headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    return body, headers


def _wrong_version(body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed(body)
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,", 1)
    return body, headers


def _not_utf8(body: bytes) -> tuple[bytes, dict[str, str]]:
    raw = body.replace(b"searchset", b"searchset\xff")
    now = int(time.time())
    return raw, {
        "webhook-id": "msg_x",
        "webhook-timestamp": str(now),
        "webhook-signature": raw_signature(raw, "msg_x", now),
    }


def _aged(minutes: int) -> Forgery:
    at = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    return lambda body: (body, signed(body, at=at))


FORGERIES: dict[str, Forgery] = {
    "no-headers": lambda body: (body, {}),
    "no-id": _without("webhook-id"),
    "no-timestamp": _without("webhook-timestamp"),
    "no-signature": _without("webhook-signature"),
    "wrong-secret": lambda body: (body, signed(body, secret=new_secret())),
    "tampered-body": _tampered,
    "other-msg-id": _other_msg_id,
    "other-timestamp": _other_timestamp,
    "timestamp-10-min-old": _aged(-10),
    "timestamp-10-min-ahead": _aged(10),
    "timestamp-not-a-number": lambda body: (body, {**signed(body), "webhook-timestamp": "now"}),
    "signature-v1": _signature("v1"),
    "signature-nonsense": _signature("nonsense"),
    "signature-empty-v1": _signature("v1,"),
    "signature-not-base64": _signature("v1,!!!not-base64!!!"),
    "signature-three-parts": _signature("v1,a,b"),
    "signature-other-version": _wrong_version,
    "body-not-utf8": _not_utf8,
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_bad_signatures_get_401_and_change_nothing(waiting, forge):
    workflow, body = waiting
    before = effects(workflow.id)
    sent, headers = forge(body)
    response = post_callback(str(workflow.search_id), sent, headers)
    assert_problem(response, 401, "unauthorized")
    assert effects(workflow.id) == before
    # Nothing was used up: the genuine callback still applies.
    genuine = post_callback(str(workflow.search_id), body, signed(body))
    assert genuine.json()["applied"] is True


def test_callbacks_are_refused_while_no_secret_is_set(waiting, settings):
    workflow, body = waiting
    settings.INTERNAL_CALLBACK_SECRET = ""
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), body, signed(body))
    assert_problem(response, 401, "unauthorized")
    assert effects(workflow.id) == before


def test_a_secret_with_an_empty_key_refuses_callbacks_with_401(waiting, settings):
    workflow, body = waiting
    settings.INTERNAL_CALLBACK_SECRET = "whsec_"
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), body, signed(body))
    assert effects(workflow.id) == before
    assert_problem(response, 401, "unauthorized")


BAD_BUNDLES = {
    "empty": b"",
    "not-json": b"<html>ok</html>",
    "json-list": b"[]",
    "operation-outcome": b'{"resourceType": "OperationOutcome", "issue": []}',
    "not-a-searchset": b'{"resourceType": "Bundle", "type": "batch-response"}',
    "score-out-of-range": json.dumps(searchset(entry("abc", 1.5))).encode(),
    "unknown-grade": json.dumps(searchset(entry("abc", 0.9, "likely"))).encode(),
    "entry-without-id": json.dumps(
        {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {}}]}
    ).encode(),
    # Deeper than Python's recursion limit: refused before json.loads, not a RecursionError.
    "nested-too-deep": b'{"resourceType": "Bundle", "type": "searchset", "x": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "nan-score": json.dumps(searchset(entry("abc", float("nan")))).encode(),
}


@pytest.mark.parametrize("bad", BAD_BUNDLES.values(), ids=BAD_BUNDLES.keys())
def test_a_signed_body_that_is_not_a_searchset_is_400(waiting, bad):
    workflow, _ = waiting
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), bad, signed(bad))
    assert_problem(response, 400, "bad-request")
    assert effects(workflow.id) == before


@pytest.mark.parametrize("grade", [["certain"], {"code": "certain"}], ids=["list", "object"])
def test_a_signed_bundle_with_an_unhashable_grade_is_400(waiting, grade):
    workflow, _ = waiting
    bad = json.dumps(searchset(entry(JANE_DOE_ID, 0.99, grade))).encode()
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), bad, signed(bad))
    assert effects(workflow.id) == before
    assert_problem(response, 400, "bad-request")


def _padded(body: bytes, size: int) -> bytes:
    document = json.loads(body)
    document["entry"][0]["resource"]["text"] = {"status": "generated", "div": ""}
    room = size - len(json.dumps(document).encode())
    document["entry"][0]["resource"]["text"]["div"] = "x" * room
    padded = json.dumps(document).encode()
    assert len(padded) == size
    return padded


def test_a_signed_callback_up_to_the_limit_is_applied(waiting, settings):
    workflow, body = waiting
    big = _padded(body, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    response = post_callback(str(workflow.search_id), big, signed(big))
    assert response.status_code == 200, response.content
    assert response.json()["applied"] is True


def test_a_callback_over_the_limit_is_413(waiting, settings):
    workflow, body = waiting
    huge = _padded(body, settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), huge, signed(huge))
    assert effects(workflow.id) == before
    assert_problem(response, 413, "payload-too-large")


def test_a_captured_callback_replayed_to_another_search_is_refused(waiting, api: LinkClient):
    # The signature does not cover the URL; the webhook-id, bound to its search, does the rest.
    workflow, body = waiting
    other = requested(api, link_body(id=str(uuid.uuid4())))
    headers = signed(body)
    assert post_callback(str(workflow.search_id), body, headers).json()["applied"] is True
    before = effects(other.id)
    replayed = post_callback(str(other.search_id), body, headers)
    assert_problem(replayed, 401, "unauthorized")
    assert effects(other.id) == before
    # Its own retries stay welcome (acknowledged, nothing new).
    assert post_callback(str(workflow.search_id), body, headers).json()["applied"] is False


def test_a_callback_for_an_unknown_search_leaves_its_id_free(waiting):
    # A 404 must not burn the webhook-id: the internal system retries the same message.
    workflow, body = waiting
    headers = signed(body)
    assert post_callback(uuid.uuid4().hex, body, headers).status_code == 404
    assert not SearchCallback.objects.filter(webhook_id=headers["webhook-id"]).exists()
    assert post_callback(str(workflow.search_id), body, headers).json()["applied"] is True


def test_an_overlong_webhook_id_is_400(waiting):
    workflow, body = waiting
    before = effects(workflow.id)
    response = post_callback(str(workflow.search_id), body, signed(body, msg_id="m" * 201))
    assert_problem(response, 400, "bad-request")
    assert effects(workflow.id) == before


def test_old_callback_ids_are_purged(waiting):
    workflow, body = waiting
    post_callback(str(workflow.search_id), body, signed(body))
    now = timezone.now()
    assert search_callbacks_purge(now=now) == 0
    assert search_callbacks_purge(now=now + dt.timedelta(days=1, seconds=1)) == 1
    assert not SearchCallback.objects.exists()


def test_unknown_search_id_with_a_good_signature_is_404(waiting):
    workflow, body = waiting
    before = effects(workflow.id)
    response = post_callback(uuid.uuid4().hex, body, signed(body))
    assert_problem(response, 404, "not-found")
    assert effects(workflow.id) == before


def test_a_bad_signature_is_401_even_for_an_unknown_search_id(waiting):
    # The signature is checked first: an unsigned caller learns nothing about search ids.
    _, body = waiting
    response = post_callback(uuid.uuid4().hex, body, {})
    assert_problem(response, 401, "unauthorized")


# --- 5. a callback racing a poll of the same job -------------------------------------------------


def on_thread(name: str, work: Callable[[], Any], results: dict[str, Any]) -> threading.Thread:
    """`work` on a thread of its own, with its own DB connection; its answer or exception goes
    to results[name]."""

    def run() -> None:
        try:
            results[name] = work()
        except BaseException as exc:
            results[name] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def race(workflow_id: Any, search_id: str, body: bytes, *, callback_delay: float) -> dict[str, Any]:
    """The worker's poll (link_process) and the signed callback, released together."""
    barrier = threading.Barrier(2)
    headers = signed(body)

    def poll() -> Any:
        barrier.wait(timeout=5)
        return link_process(workflow_id=workflow_id)

    def callback() -> Any:
        barrier.wait(timeout=5)
        time.sleep(callback_delay)
        return post_callback(search_id, body, headers)

    results: dict[str, Any] = {}
    threads = [on_thread("poll", poll, results), on_thread("callback", callback, results)]
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert errors == []
    return results


# How long the callback waits after the barrier, per round: it lands before the worker's claim,
# during its poll or while it applies the answer, so that each side wins some rounds.
CALLBACK_DELAYS = [0.0, 0.0, 0.0, 0.004, 0.008, 0.012, 0.016, 0.024, 0.032, 0.048]
ROUNDS = len(CALLBACK_DELAYS)


@pytest.mark.django_db(transaction=True)
def test_callback_and_poll_of_one_job_have_exactly_one_effect(api: LinkClient, standin):
    control(standin, "config", {"async_delay_ms": 0})  # every job done as soon as made
    winners: list[str] = []
    for delay in CALLBACK_DELAYS:
        workflow = requested(api)
        search_id = str(workflow.search_id)
        body = job_bundle(standin, search_id)
        results = race(workflow.id, search_id, body, callback_delay=delay)
        assert results["poll"].retry_in is None
        response = results["callback"]
        assert response.status_code == 200
        receipt = response.json()
        assert receipt["status"] == "COMPLETED"

        workflow.refresh_from_db()
        assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
        transitions = WorkflowTransition.objects.filter(workflow_id=workflow.id)
        assert transitions.filter(target=Status.COMPLETED).count() == 1
        linked_by = transitions.get(target=Status.LINKED).actor
        # Exactly one of the two reports the effect, and it is the one the timeline names.
        assert linked_by == (CALLBACK if receipt["applied"] else WORKER)
        assert transitions.get(target=Status.COMPLETED).actor == linked_by
        assert PatientMapping.objects.filter(workflow_id=workflow.id).count() == 1
        assert LinkHistory.objects.filter(workflow_id=workflow.id).count() == 1
        assert SearchCandidate.objects.filter(workflow_id=workflow.id).count() == 1
        assert WebhookDelivery.objects.filter(workflow_id=workflow.id).count() == 1
        winners.append(linked_by)
    assert len(winners) == ROUNDS
    assert PatientMapping.objects.count() == ROUNDS
    assert WebhookDelivery.objects.count() == ROUNDS


@pytest.mark.django_db(transaction=True)
def test_callback_during_a_slow_poll_wins_and_the_poll_drops_its_answer(api: LinkClient, standin):
    workflow = requested(api)
    body = job_bundle(standin, str(workflow.search_id))
    control(standin, "config", {"latency_ms": 800})  # the worker's poll is slow to answer
    results: dict[str, Any] = {}
    thread = on_thread("poll", lambda: link_process(workflow_id=workflow.id), results)
    deadline = time.monotonic() + 5
    while Workflow.objects.get(id=workflow.id).attempts < 2:  # the worker's claim is committed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    claimed = Workflow.objects.get(id=workflow.id)
    assert claimed.claim_id is not None

    response = post_callback(str(workflow.search_id), body, signed(body))
    assert response.status_code == 200
    assert response.json()["applied"] is True
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert isinstance(results["poll"], ProcessOutcome), results["poll"]
    assert results["poll"].retry_in is None

    assert stats(standin)["job_polls"] == 2  # the worker's poll did answer, after the callback
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    transitions = WorkflowTransition.objects.filter(workflow_id=workflow.id)
    assert list(transitions.filter(actor=WORKER).values_list("target", flat=True)) == [
        Status.IN_PROGRESS,
        Status.REQUESTED,
    ]
    assert transitions.filter(target=Status.COMPLETED).get().actor == CALLBACK
    assert PatientMapping.objects.count() == 1
    assert SearchCandidate.objects.count() == 1
    assert WebhookDelivery.objects.count() == 1


# --- the stand-in's own signed callback, into a live server --------------------------------------


@pytest.fixture
def calling_standin(settings: Any, live_server: Any) -> Iterator[StandinServer]:
    """The stand-in with its result callback aimed at this project, served by a live server."""
    server = make_server(
        "127.0.0.1",
        0,
        async_delay_ms=-1,
        callback_url=f"{live_server.url}/internal/search-results/{{search_id}}",
        callback_secret=SECRET,
    )
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        yield server


@pytest.mark.django_db(transaction=True)
def test_the_internal_systems_signed_callback_links(api: LinkClient, calling_standin):
    workflow = requested(api)
    assert control(calling_standin, "complete-jobs") == {"completed": 1}
    deadline = time.monotonic() + 10
    while Workflow.objects.get(id=workflow.id).status == Status.REQUESTED:
        assert time.monotonic() < deadline, stats(calling_standin)
        time.sleep(0.05)
    workflow.refresh_from_db()
    assert (workflow.status, workflow.result) == (Status.COMPLETED, Result.LINKED)
    assert transitions_by(workflow.id, Status.LINKED) == CALLBACK
    deadline = time.monotonic() + 5
    while stats(calling_standin)["callbacks_sent"] < 1:  # counted once our answer reached it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    counters = stats(calling_standin)
    assert (counters["callbacks_sent"], counters["callback_failures"], counters["job_polls"]) == (
        1,
        0,
        0,
    )
    assert PatientMapping.objects.get().internal_patient_id == JANE_DOE_ID


def transitions_by(workflow_id: Any, target: str) -> str:
    actor: str = WorkflowTransition.objects.get(workflow_id=workflow_id, target=target).actor
    return actor
