"""The asynchronous internal search end to end (contract section 2): the match answers 202 with
a job, the workflow waits in REQUESTED, and the result arrives by the stand-in's signed
callback to gunicorn, or by the sweep's poll of the job when no callback lands, exactly once
when both arrive."""

import datetime as dt
import json
import re
import time
import uuid
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from linking.models import MappingStatus, PatientMapping, SearchCandidate
from merchant.services import CustomerCredentials
from standin.receiver import Delivery, ReceiverServer
from standin.server import StandinServer
from tests.conftest import link_body
from tests.e2e.conftest import E2E_SETTINGS, control_root, standin_stats, wait_until
from tests.e2e_async.conftest import (
    CALLBACK_PATH,
    CALLBACK_SECRET,
    AsyncStack,
    Gate,
    standin_complete_jobs,
    standin_config,
)
from tests.processes import wait_for_text
from workflows.models import Status, WebhookDelivery, Workflow

pytestmark = pytest.mark.django_db(transaction=True)

JANE_INTERNAL_ID = "0c8eca2a00d55380a788b6f950b8c635"
# Two `certain` candidates at 0.97: the review band, never guessed.
AMBIGUOUS = {"full_name": "Alex Rivera", "dob": "1975-09-14", "contact": {}}
STALE_AFTER = int(E2E_SETTINGS["RECONCILE_STALE_AFTER_SECONDS"])
SWEEP_INTERVAL = int(E2E_SETTINGS["RECONCILE_INTERVAL_SECONDS"])
# The sweep re-queues after STALE_AFTER (5 s) and runs every second; the worker then polls.
POLL_TIMEOUT = STALE_AFTER + 15
SEARCH_ID = re.compile(r"[0-9a-f]{32}")


# --- helpers ------------------------------------------------------------------------------------


def applied_forwards(gate: Gate, search_id: str) -> list[Any]:
    """The gate's record of the callbacks it forwarded, once one has come back applied. The
    workflow's new state (what the test waited for) commits before gunicorn's answer reaches
    the gate, so reading the record at once can miss that answer."""
    return wait_until(
        lambda: (
            (found := gate.forwarded(search_id))
            and any(f.status == 200 and f.json().get("applied") for f in found)
            and found
        ),
        what="the gate to record an applied callback",
    )


def post_link(
    stack: AsyncStack, customer: CustomerCredentials, **patient: Any
) -> tuple[str, dict[str, Any]]:
    """POST /link to the real gunicorn; the workflow id and the body sent."""
    body = link_body(**patient)
    response = requests.post(
        f"{stack.base}/link",
        json=body,
        timeout=10,
        headers={"customer-token": customer.token, "Idempotency-Key": body["patient"]["id"]},
    )
    assert response.status_code == 202, response.text
    workflow_id: str = response.json()["workflow-id"]
    return workflow_id, body


def reaches(workflow_id: str, *statuses: str, timeout: float = 20) -> Workflow:
    def check() -> Workflow | None:
        workflow = Workflow.objects.get(id=workflow_id)
        return workflow if workflow.status in statuses else None

    found: Workflow = wait_until(check, timeout=timeout, what=f"{workflow_id} in {statuses}")
    return found


def requested(workflow_id: str) -> Workflow:
    """The workflow once its search was taken as a job (REQUESTED with a search id), or later."""

    def check() -> Workflow | None:
        workflow = Workflow.objects.get(id=workflow_id)
        return workflow if workflow.search_id else None

    found: Workflow = wait_until(check, what=f"{workflow_id} to get a search id")
    assert SEARCH_ID.fullmatch(found.search_id or ""), found.search_id
    return found


def timeline(workflow: Workflow) -> list[tuple[str, str, str]]:
    return [(t.source, t.target, t.actor) for t in workflow.transitions.all()]


def deliveries_for(receiver: ReceiverServer, workflow_id: str) -> list[Delivery]:
    return [d for d in receiver.deliveries() if d.json()["data"]["workflow-id"] == workflow_id]


def delivered(receiver: ReceiverServer, workflow_id: str, count: int = 1) -> list[Delivery]:
    found: list[Delivery] = wait_until(
        lambda: (found := deliveries_for(receiver, workflow_id)) and len(found) >= count and found,
        what=f"{count} webhook(s) for {workflow_id}",
    )
    return found


def verified_payload(customer: CustomerCredentials, delivery: Delivery) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(customer.customer.webhook_secret).verify(
        delivery.body, delivery.headers
    )
    return payload


def assert_linked_jane(workflow: Workflow, body: dict[str, Any]) -> PatientMapping:
    assert (workflow.status, workflow.result) == (Status.COMPLETED, "LINKED")
    [mapping] = PatientMapping.objects.filter(workflow=workflow)
    assert mapping.internal_patient_id == JANE_INTERNAL_ID
    assert str(mapping.customer_patient_id) == body["patient"]["id"]
    assert mapping.status == MappingStatus.LINKED and mapping.match_grade == "certain"
    return mapping


def assert_one_completed_webhook(
    customer: CustomerCredentials, receiver: ReceiverServer, workflow_id: str, body: dict[str, Any]
) -> None:
    [delivery] = delivered(receiver, workflow_id)
    assert delivery.verified is True
    payload = verified_payload(customer, delivery)
    assert payload["type"] == "link.completed"
    assert payload["data"] == {
        "workflow-id": workflow_id,
        "status": "COMPLETED",
        "result": "LINKED",
        "customer-patient-id": body["patient"]["id"],
        "reason": None,
    }


def job_polls(standin: StandinServer) -> int:
    return int(standin_stats(standin)["job_polls"])


def forged_callback(
    stack: AsyncStack, search_id: str, body: bytes, headers: dict[str, str]
) -> requests.Response:
    return requests.post(
        f"{stack.base}{CALLBACK_PATH}{search_id}",
        data=body,
        headers={"Content-Type": "application/fhir+json", **headers},
        timeout=10,
    )


def signed_headers(secret: str, body: bytes) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = dt.datetime.now(dt.UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode()),
    }


def bundle_for(internal_patient_id: str) -> bytes:
    """A searchset with one certain candidate: what a forger would like us to link to."""
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [
                {
                    "resource": {"resourceType": "Patient", "id": internal_patient_id},
                    "search": {
                        "mode": "match",
                        "score": 0.99,
                        "extension": [
                            {
                                "url": "http://hl7.org/fhir/StructureDefinition/match-grade",
                                "valueCode": "certain",
                            }
                        ],
                    },
                }
            ],
        }
    ).encode()


# --- tests --------------------------------------------------------------------------------------


def test_result_arrives_by_the_callback(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    workflow_id, body = post_link(async_stack, customer)
    search_id = requested(workflow_id).search_id
    assert search_id is not None

    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED)
    mapping = assert_linked_jane(workflow, body)
    assert workflow.search_id == search_id
    assert timeline(workflow) == [
        ("", "RECEIVED", "api"),
        ("RECEIVED", "IN_PROGRESS", "worker"),
        ("IN_PROGRESS", "REQUESTED", "worker"),
        ("REQUESTED", "LINKED", "search-callback"),
        ("LINKED", "COMPLETED", "search-callback"),
    ]
    assert workflow.attempts == 1 and workflow.requeues == 0
    assert mapping.score == pytest.approx(0.99)
    [candidate] = SearchCandidate.objects.filter(workflow=workflow)
    assert candidate.internal_patient_id == JANE_INTERNAL_ID

    # The stand-in delivered it through the gate; gunicorn applied it.
    [answer] = [f for f in applied_forwards(gate, search_id) if f.status == 200]
    assert answer.json() == {"workflow-id": workflow_id, "applied": True, "status": "COMPLETED"}
    stats = standin_stats(standin)
    assert stats["match_calls"] == 1
    assert stats["job_polls"] == 0  # nobody polled: the callback did it all
    assert stats["callbacks_sent"] == 1

    assert_one_completed_webhook(customer, receiver, workflow_id, body)


def test_result_arrives_by_the_sweeps_poll_when_the_callback_never_lands(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    gate.set_mode("refuse")
    workflow_id, body = post_link(async_stack, customer)
    search_id = requested(workflow_id).search_id
    assert search_id is not None
    # The stand-in gives up after its 4 attempts (0.25 + 0.5 + 1 s of backoff).
    wait_until(lambda: standin_stats(standin)["callback_failures"] >= 4, what="4 refused callbacks")
    assert Workflow.objects.get(id=workflow_id).status == Status.REQUESTED

    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED, timeout=POLL_TIMEOUT)
    assert_linked_jane(workflow, body)
    assert timeline(workflow) == [
        ("", "RECEIVED", "api"),
        ("RECEIVED", "IN_PROGRESS", "worker"),
        ("IN_PROGRESS", "REQUESTED", "worker"),
        ("REQUESTED", "REQUESTED", "sweep"),  # the re-queue
        ("REQUESTED", "LINKED", "worker"),
        ("LINKED", "COMPLETED", "worker"),
    ]
    assert workflow.requeues == 1 and workflow.attempts == 2
    stats = standin_stats(standin)
    assert stats["job_polls"] >= 1
    assert stats["match_calls"] == 1  # the job was polled, not searched again
    assert stats["callbacks_sent"] == 0
    assert gate.arrived(search_id, "refuse") == 4 and gate.forwarded(search_id) == []

    assert_one_completed_webhook(customer, receiver, workflow_id, body)


def test_callback_after_the_poll_won_is_acknowledged_and_ignored(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    gate.set_mode("hold")
    workflow_id, body = post_link(async_stack, customer)
    search_id = requested(workflow_id).search_id
    assert search_id is not None
    wait_until(lambda: gate.arrived(search_id, "hold"), what="the callback held at the gate")

    # The sweep's poll completes the workflow while the callback is held.
    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED, timeout=POLL_TIMEOUT)
    assert_linked_jane(workflow, body)
    assert job_polls(standin) >= 1
    held = gate.arrived(search_id, "hold")
    assert gate.forwarded(search_id) == []

    gate.release_held()
    answers = wait_until(
        lambda: (found := gate.forwarded(search_id)) and len(found) >= held and found,
        what="the held callbacks to be forwarded",
    )
    for answer in answers:
        assert answer.status == 200, answer.body
        assert answer.json() == {
            "workflow-id": workflow_id,
            "applied": False,
            "status": "COMPLETED",
        }

    # Exactly one effect.
    workflow.refresh_from_db()
    assert workflow.status == Status.COMPLETED
    assert PatientMapping.objects.filter(workflow=workflow).count() == 1
    assert workflow.transitions.filter(target=Status.COMPLETED).count() == 1
    assert workflow.transitions.filter(target=Status.LINKED).get().actor == "worker"
    assert not workflow.transitions.filter(actor="search-callback").exists()
    assert WebhookDelivery.objects.filter(workflow=workflow).count() == 1
    assert_one_completed_webhook(customer, receiver, workflow_id, body)
    time.sleep(2 * SWEEP_INTERVAL + 0.5)  # beat dispatches due webhooks every second
    assert len(deliveries_for(receiver, workflow_id)) == 1


def test_forged_callbacks_are_refused_and_change_nothing(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    standin_config(standin, async_delay_ms=-1)  # pending until /_control/complete-jobs
    workflow_id, body = post_link(async_stack, customer)
    before = requested(workflow_id)
    search_id = before.search_id
    assert search_id is not None and before.status == Status.REQUESTED
    steps_before = timeline(before)

    forged = bundle_for("bef547d80bc951c0b70792b4248204e6")  # someone else entirely
    wrong_secret = "whsec_" + "d3Jvbmcgc2VjcmV0IG9mIGEgZm9yZ2Vy"
    # The right secret, but signing another body: a signature replayed onto a forged body.
    genuine_for_other_body = signed_headers(CALLBACK_SECRET, bundle_for(JANE_INTERNAL_ID))
    attempts = {
        "wrong secret": signed_headers(wrong_secret, forged),
        "no signature": {},
        "signature of another body": genuine_for_other_body,
    }
    for what, headers in attempts.items():
        response = forged_callback(async_stack, search_id, forged, headers)
        assert response.status_code == 401, (what, response.text)
        assert response.headers["Content-Type"] == "application/problem+json", what
        problem = response.json()
        assert problem["status"] == 401 and problem["type"].endswith("/unauthorized"), problem

    # A genuine signature for a search id nobody waits for: 404, so the sender would retry.
    unknown = forged_callback(
        async_stack, uuid.uuid4().hex, forged, signed_headers(CALLBACK_SECRET, forged)
    )
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("/not-found")

    after = Workflow.objects.get(id=workflow_id)
    assert after.status == Status.REQUESTED
    assert after.updated_at == before.updated_at and after.attempts == before.attempts
    assert timeline(after) == steps_before
    assert not PatientMapping.objects.filter(workflow=after).exists()
    assert not SearchCandidate.objects.filter(workflow=after).exists()
    assert not WebhookDelivery.objects.filter(workflow=after).exists()

    # The genuine callback, signed by the stand-in and forwarded by the gate, completes it.
    assert standin_complete_jobs(standin) == 1
    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED)
    assert_linked_jane(workflow, body)
    assert workflow.transitions.filter(target=Status.LINKED).get().actor == "search-callback"
    [answer] = applied_forwards(gate, search_id)
    assert answer.status == 200 and answer.json()["applied"] is True
    assert_one_completed_webhook(customer, receiver, workflow_id, body)


def test_review_band_waits_for_an_operator_and_is_not_swept(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    workflow_id, _ = post_link(async_stack, customer, **AMBIGUOUS)
    search_id = requested(workflow_id).search_id
    assert search_id is not None

    workflow = reaches(workflow_id, Status.REVIEW, Status.COMPLETED, Status.FAILED)
    assert workflow.status == Status.REVIEW
    assert workflow.result is None
    assert timeline(workflow)[-1] == ("REQUESTED", "REVIEW", "search-callback")
    assert workflow.claim_id is None  # nobody holds it: it waits for a person
    candidates = SearchCandidate.objects.filter(workflow=workflow).order_by("rank")
    assert [c.internal_patient_id for c in candidates] == [
        "bef547d80bc951c0b70792b4248204e6",
        "c683023a29175d0a99f8ce671ef80f99",
    ]
    [answer] = applied_forwards(gate, search_id)
    assert answer.json() == {"workflow-id": workflow_id, "applied": True, "status": "REVIEW"}

    # Stale for longer than the threshold, with several sweeps run meanwhile: untouched.
    sweeps_before = async_stack.beat_log.read_text().count("reconcile-workflows")
    steps = timeline(workflow)
    time.sleep(STALE_AFTER + 3 * SWEEP_INTERVAL + 0.5)
    assert async_stack.beat_log.read_text().count("reconcile-workflows") >= sweeps_before + 3

    after = Workflow.objects.get(id=workflow_id)
    assert after.status == Status.REVIEW
    assert (after.requeues, after.attempts) == (workflow.requeues, workflow.attempts)
    assert after.updated_at == workflow.updated_at
    assert timeline(after) == steps
    assert not PatientMapping.objects.filter(workflow=after).exists()
    assert not WebhookDelivery.objects.filter(workflow=after).exists()
    assert deliveries_for(receiver, workflow_id) == []
    assert job_polls(standin) == 0


def test_callback_that_beats_the_commit_is_retried_and_applied(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    # Jobs done at once: the stand-in calls back before its 202 reaches the worker, so the
    # search id is usually not committed yet (404, "retry"); a later attempt applies it.
    standin_config(standin, async_delay_ms=0)
    workflow_id, body = post_link(async_stack, customer)
    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED)
    assert_linked_jane(workflow, body)
    assert workflow.transitions.filter(target=Status.LINKED).get().actor == "search-callback"
    assert workflow.search_id is not None
    answers = applied_forwards(gate, workflow.search_id)
    *early, last = answers
    assert last.status == 200 and last.json()["applied"] is True
    for answer in early:
        assert answer.status == 404 and answer.json()["type"].endswith("/not-found")
    stats = standin_stats(standin)
    assert (stats["match_calls"], stats["job_polls"], stats["callbacks_sent"]) == (1, 0, 1)
    assert stats["callback_failures"] == len(early)
    assert_one_completed_webhook(customer, receiver, workflow_id, body)


def test_callback_landing_during_the_workers_poll_wins_and_the_poll_is_dropped(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    gate.set_mode("hold")
    workflow_id, body = post_link(async_stack, customer)
    search_id = requested(workflow_id).search_id
    assert search_id is not None
    wait_until(lambda: gate.arrived(search_id, "hold"), what="the callback held at the gate")
    # Job polls now take 0.8 s (under INTERNAL_SEARCH_READ_TIMEOUT=1): a window to land in.
    standin_config(standin, latency_ms=800)

    def polling() -> bool:
        workflow = Workflow.objects.get(id=workflow_id)
        # The worker commits its claim (a second attempt) just before it polls.
        return workflow.attempts == 2 and workflow.claim_id is not None

    deadline = time.monotonic() + POLL_TIMEOUT
    while not polling():
        assert time.monotonic() < deadline, "the sweep's re-queue never reached the worker"
        time.sleep(0.02)
    gate.release_held()

    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED)
    assert_linked_jane(workflow, body)
    assert timeline(workflow)[-3:] == [
        ("REQUESTED", "REQUESTED", "sweep"),
        ("REQUESTED", "LINKED", "search-callback"),
        ("LINKED", "COMPLETED", "search-callback"),
    ]
    applied = [
        f for f in applied_forwards(gate, search_id) if f.status == 200 and f.json()["applied"]
    ]
    assert len(applied) == 1
    # The poll's answer came back after the callback had been applied: dropped, no effect.
    wait_until(lambda: job_polls(standin) >= 1, what="the worker's poll")
    wait_for_text(async_stack.worker_log, f"workflow {workflow_id} was taken over", timeout=10)
    workflow.refresh_from_db()
    assert workflow.status == Status.COMPLETED
    assert PatientMapping.objects.filter(workflow=workflow).count() == 1
    assert workflow.transitions.filter(target=Status.COMPLETED).count() == 1
    assert WebhookDelivery.objects.filter(workflow=workflow).count() == 1
    assert_one_completed_webhook(customer, receiver, workflow_id, body)


def test_a_job_the_internal_system_lost_is_searched_again(
    async_stack: AsyncStack,
    customer: CustomerCredentials,
    standin: StandinServer,
    gate: Gate,
    receiver: ReceiverServer,
) -> None:
    gate.set_mode("refuse")
    workflow_id, body = post_link(async_stack, customer)
    first_search_id = requested(workflow_id).search_id
    wait_until(lambda: standin_stats(standin)["callback_failures"] >= 4, what="4 refused callbacks")
    # The internal system forgets its jobs; its callbacks get through again.
    requests.post(f"{control_root(standin)}/_control/reset", timeout=5).raise_for_status()
    gate.set_mode("forward")

    workflow = reaches(workflow_id, Status.COMPLETED, Status.FAILED, timeout=POLL_TIMEOUT)
    assert_linked_jane(workflow, body)
    assert workflow.search_id is not None and workflow.search_id != first_search_id
    assert timeline(workflow)[2:] == [
        ("IN_PROGRESS", "REQUESTED", "worker"),
        ("REQUESTED", "REQUESTED", "sweep"),  # the re-queue: the poll answers 404
        ("REQUESTED", "REQUESTED", "worker"),  # searched again: a new job
        ("REQUESTED", "LINKED", "search-callback"),
        ("LINKED", "COMPLETED", "search-callback"),
    ]
    stats = standin_stats(standin)  # since the reset
    assert (stats["job_polls"], stats["match_calls"], stats["callbacks_sent"]) == (1, 1, 1)
    assert PatientMapping.objects.filter(workflow=workflow).count() == 1
    assert_one_completed_webhook(customer, receiver, workflow_id, body)
