"""Idempotency-Key semantics (docs/api.md "POST /link"), against the real PostgreSQL."""

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from linking.models import IdempotencyRecord, LinkRequest
from linking.services import idempotency_purge_expired
from tests.conftest import LinkClient, link_body
from workflows.models import Workflow

pytestmark = pytest.mark.django_db(transaction=True)


def test_replay_returns_first_response_with_replayed_header(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="same")
    again = api.post_link(body, key="same")

    assert again.status_code == first.status_code == 202
    assert again.content == first.content  # byte for byte
    assert again["Location"] == first["Location"]
    assert again["Retry-After"] == first["Retry-After"]
    assert again["Idempotent-Replayed"] == "true"
    assert Workflow.objects.count() == 1


def test_replay_ignores_key_order_and_spacing(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="same")
    reordered = {"patient": dict(reversed(list(body["patient"].items())))}
    again = api.post_link(reordered, key="same")
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"


def test_replay_still_works_after_the_workflow_moved_on(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="same")
    workflow = Workflow.objects.get(id=first.json()["workflow-id"])
    workflow.fail(reason="test")
    workflow.save()
    again = api.post_link(body, key="same")
    assert again.status_code == 202
    assert again.content == first.content


def test_same_key_with_different_body_is_422(api: LinkClient) -> None:
    api.post_link(link_body(), key="same")
    response = api.post_link(link_body(), key="same")
    assert response.status_code == 422
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/idempotency-key-reused"
    assert Workflow.objects.count() == 1


def test_same_key_while_first_is_in_flight_is_409(api: LinkClient, credentials) -> None:
    # Hold the key's lock from another connection, as a first request still in its
    # transaction would.
    holder_ready, release = threading.Event(), threading.Event()
    key = "in-flight"

    def hold_lock() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    [f"idempotency:{credentials.customer.id}:{key}"],
                )
                holder_ready.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    try:
        assert holder_ready.wait(10)
        response = api.post_link(link_body(), key=key)
    finally:
        release.set()
        thread.join()
    assert response.status_code == 409
    assert response.json()["type"] == "/problems/idempotency-request-in-flight"
    assert int(response["Retry-After"]) >= 1
    assert Workflow.objects.count() == 0
    # Once the first is done, the same request goes through.
    assert api.post_link(link_body(), key=key).status_code == 202


def test_missing_key_is_400(api: LinkClient) -> None:
    response = api.post_link(link_body(), key=None)
    assert response.status_code == 400
    assert response.json()["type"] == "/problems/idempotency-key-missing"
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "naïve", "bell\x07"])
def test_oversized_or_unprintable_key_is_400(api: LinkClient, key: str) -> None:
    response = api.post_link(link_body(), key=key)
    assert response.status_code == 400
    assert response.json()["type"] == "/problems/idempotency-key-invalid"
    assert Workflow.objects.count() == 0


def test_key_of_255_printable_characters_is_accepted(api: LinkClient) -> None:
    assert api.post_link(link_body(), key="k" * 254 + "~").status_code == 202


def test_header_name_is_case_insensitive(api: LinkClient) -> None:
    body = link_body()
    first = api.client.post(
        "/link",
        body,
        format="json",
        HTTP_CUSTOMER_TOKEN=api.token,
        headers={"IDEMPOTENCY-KEY": "ci"},
    )
    again = api.client.post(
        "/link",
        body,
        format="json",
        HTTP_CUSTOMER_TOKEN=api.token,
        headers={"idempotency-key": "ci"},
    )
    assert first.status_code == 202
    assert again["Idempotent-Replayed"] == "true"


def test_two_customers_same_key_get_two_workflows(api: LinkClient, other_api: LinkClient) -> None:
    first = api.post_link(link_body(), key="shared")
    second = other_api.post_link(link_body(), key="shared")
    assert first.status_code == second.status_code == 202
    assert first.json()["workflow-id"] != second.json()["workflow-id"]
    assert "Idempotent-Replayed" not in second
    assert Workflow.objects.count() == 2


def test_fifty_concurrent_requests_with_one_key_make_one_workflow(credentials) -> None:
    body = link_body()
    start = threading.Barrier(50)

    def post(_: int) -> tuple[int, dict]:
        client = LinkClient(credentials.token)
        try:
            start.wait(10)
            response = client.post_link(body, key="race")
            return response.status_code, response.json()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(post, range(50)))

    statuses = [status for status, _ in results]
    assert set(statuses) <= {202, 409}, statuses
    assert Workflow.objects.count() == 1
    assert LinkRequest.objects.count() == 1
    assert IdempotencyRecord.objects.count() == 1
    workflow_id = str(Workflow.objects.get().id)
    accepted = [data for status, data in results if status == 202]
    assert accepted and all(data["workflow-id"] == workflow_id for data in accepted)
    conflicts = [data for status, data in results if status == 409]
    assert all(d["type"] == "/problems/idempotency-request-in-flight" for d in conflicts)


def test_expired_record_frees_the_key_and_is_purged(api: LinkClient) -> None:
    body = link_body()
    first = api.post_link(body, key="old").json()["workflow-id"]
    Workflow.objects.filter(id=first).update(status="FAILED")
    IdempotencyRecord.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    again = api.post_link(body, key="old")
    assert again.status_code == 202
    assert "Idempotent-Replayed" not in again
    assert again.json()["workflow-id"] != first

    IdempotencyRecord.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    api.post_link(link_body(), key="fresh")
    assert idempotency_purge_expired() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["fresh"]


def test_retention_is_the_configured_ttl(api: LinkClient, settings) -> None:
    settings.IDEMPOTENCY_TTL_SECONDS = 172800
    api.post_link(link_body(), key="ttl")
    record = IdempotencyRecord.objects.get()
    assert record.expires_at - record.created_at == dt.timedelta(seconds=172800)
