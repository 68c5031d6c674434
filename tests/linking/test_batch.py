"""POST /link/batch and GET /link/batch/<id> (issue 19, item 4): each item exactly a POST /link
(validation, refusals, per-item idempotency), a refused item never refusing the others, every
accepted item durable before the 202 and in one transaction, the batch's own key replaying."""

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from django.utils import timezone

from linking.models import IdempotencyRecord, LinkBatch, LinkRequest
from linking.services import link_process
from linking.tasks import purge_idempotency_records
from tests.conftest import LinkClient, link_body
from tests.linking.test_ack_path import _rows
from tests.merchant.test_abuse_limits import assert_rate_limited
from workflows.models import Status, Workflow

pytestmark = pytest.mark.django_db


def item(key: str, **patient: Any) -> dict[str, Any]:
    return {"idempotency-key": key, **link_body(**patient)}


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    body: dict[str, Any] = response.json()
    return body


def test_every_item_accepted_as_post_link_accepts_it(api: LinkClient) -> None:
    items = [item(f"k{n}") for n in range(3)]
    response = api.post_batch({"requests": items})
    body = accepted(response)
    assert body["accepted"] == 3 and body["refused"] == 0
    assert [i["index"] for i in body["items"]] == [0, 1, 2]
    assert response["Location"] == f"/link/batch/{body['batch-id']}"
    for answer, sent in zip(body["items"], items, strict=True):
        workflow = Workflow.objects.get(id=answer["workflow-id"])
        assert (workflow.status, str(workflow.patient_id)) == ("RECEIVED", sent["patient"]["id"])
        record = IdempotencyRecord.objects.get(key=sent["idempotency-key"])
        assert record.workflow_id == workflow.id
    # An item's key is the Idempotency-Key of that POST /link: sent alone, it is a replay.
    first = {k: v for k, v in items[0].items() if k != "idempotency-key"}
    replay = api.post_link(first, key="k0")
    assert replay.status_code == 202
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json()["workflow-id"] == body["items"][0]["workflow-id"]


def test_a_refused_item_never_refuses_the_others(api: LinkClient) -> None:
    linked = api.post_link(link_body(), key="earlier").json()["workflow-id"]
    Workflow.objects.filter(id=linked).update(status=Status.COMPLETED)
    twice = link_body()
    same_key = item("same")
    items = [
        item("ok-0"),
        {"idempotency-key": "no-dob", "patient": {**link_body()["patient"], "dob": "soon"}},
        link_body(),  # no idempotency-key
        {"idempotency-key": " spaced ", **link_body()},
        item("thin", full_name="Test Patient"),
        {"idempotency-key": "twice-a", **twice},
        {"idempotency-key": "twice-b", **twice},  # the same patient, already pending
        same_key,
        same_key,  # the same key and body: a replay of the item before
        {**item("same"), "webhook": "https://hooks.acme.example/other"},  # another body
        {"idempotency-key": "extra", **link_body(), "colour": "blue"},
        item("ok-1"),
    ]
    body = accepted(api.post_batch({"requests": items}))
    kinds = [
        i["problem"]["type"].removeprefix("/problems/") if "problem" in i else "accepted"
        for i in body["items"]
    ]
    assert kinds == [
        "accepted",
        "validation-error",
        "idempotency-key-missing",
        "idempotency-key-invalid",
        "insufficient-demographics",
        "accepted",
        "link-in-progress",
        "accepted",
        "accepted",
        "idempotency-key-reused",
        "validation-error",
        "accepted",
    ]
    problems = {i["index"]: i["problem"] for i in body["items"] if "problem" in i}
    assert problems[1]["errors"][0]["field"] == "patient.dob"
    assert problems[1]["status"] == 400
    assert problems[10]["errors"] == [{"field": "colour", "detail": "Unknown field."}]
    assert problems[6]["workflow-id"] == body["items"][5]["workflow-id"]
    assert body["items"][8]["workflow-id"] == body["items"][7]["workflow-id"]
    assert (body["accepted"], body["refused"]) == (5, 7)
    # Four new workflows (the ninth item is the eighth's replay), besides the earlier one.
    assert Workflow.objects.count() == 5
    assert LinkRequest.objects.count() == 5


def test_the_batch_key_replays_the_answer(api: LinkClient) -> None:
    batch = {"requests": [item("r0"), item("r1", full_name="Unknown")]}
    first = accepted(api.post_batch(batch, key="B"))
    again = api.post_batch(batch, key="B")
    assert accepted(again) == first
    assert again["Idempotent-Replayed"] == "true"
    assert Workflow.objects.count() == 1
    other = api.post_batch({"requests": [item("r2")]}, key="B")
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    missing = api.post_batch(batch, key=None)
    assert missing.status_code == 400
    assert missing.json()["type"] == "/problems/idempotency-key-missing"


def test_an_expired_batch_key_is_free_again_and_the_batch_still_readable(
    api: LinkClient,
) -> None:
    first = accepted(api.post_batch({"requests": [item("e0")]}, key="E"))
    LinkBatch.objects.update(expires_at="2000-01-01T00:00:00Z")
    second = accepted(api.post_batch({"requests": [item("e1")]}, key="E"))
    assert second["batch-id"] != first["batch-id"]
    assert api.batch(first["batch-id"]).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"requests": []},
        {"requests": "x"},
        {"requests": [1, 2]},
        {"requests": [{"idempotency-key": "a"}], "more": 1},
    ],
)
def test_a_bad_envelope_refuses_the_batch(api: LinkClient, body: Any) -> None:
    response = api.post_batch(body)
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/validation-error"
    assert not Workflow.objects.exists() and not LinkBatch.objects.exists()


def test_at_most_link_batch_max_items(api: LinkClient, settings: Any) -> None:
    over = {"requests": [item(f"m{n}") for n in range(settings.LINK_BATCH_MAX_ITEMS + 1)]}
    response = api.post_batch(over)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "requests"
    assert not Workflow.objects.exists()


def test_a_body_over_the_batch_limit_is_413(api: LinkClient, settings: Any) -> None:
    padded = {"requests": [item("p", full_name="Jane " + "Q" * settings.LINK_BATCH_MAX_BODY_BYTES)]}
    response = api.post_batch(padded)
    assert response.status_code == 413
    assert response.json()["type"] == "/problems/payload-too-large"
    # ... while POST /link keeps its own 64 KiB.
    single = api.post_link(link_body(full_name="Jane " + "Q" * settings.LINK_MAX_BODY_BYTES))
    assert single.status_code == 413


def test_the_batch_is_one_transaction(api: LinkClient, monkeypatch: Any) -> None:
    """Nothing of a batch is kept unless all of it is: the answer is recorded last."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(LinkBatch.objects, "create", fail)
    response = api.post_batch({"requests": [item("t0"), item("t1")]})
    assert response.status_code == 500
    assert response.json()["type"] == "/problems/internal-error"
    assert not Workflow.objects.exists()
    assert not IdempotencyRecord.objects.exists()
    assert not LinkRequest.objects.exists()


def test_the_batch_status_follows_its_workflows(api: LinkClient, standin: Any) -> None:
    body = accepted(
        api.post_batch({"requests": [item("s0"), item("s1"), item("s2", full_name="N/A")]})
    )
    status = api.batch(body["batch-id"])
    assert status.status_code == 200
    assert status.json()["by-status"] == {"RECEIVED": 2}
    link_process(workflow_id=body["items"][0]["workflow-id"])
    report = api.batch(body["batch-id"]).json()
    assert report["batch-id"] == body["batch-id"]
    assert report["total"] == 3
    assert report["by-status"] == {"COMPLETED": 1, "RECEIVED": 1}
    assert report["items"][0] | {} == {
        "index": 0,
        "workflow-id": body["items"][0]["workflow-id"],
        "status": "COMPLETED",
        "result": "LINKED",
    }
    assert report["items"][1]["status"] == "RECEIVED"
    assert report["items"][2]["problem"]["type"] == "/problems/insufficient-demographics"


def test_another_customers_batch_is_an_unknown_one(api: LinkClient, other_api: LinkClient) -> None:
    body = accepted(api.post_batch({"requests": [item("o0")]}))
    unknown = other_api.batch(str(uuid.uuid4()))
    for asked in (body["batch-id"], "not-a-uuid"):
        theirs = other_api.batch(asked)
        assert theirs.status_code == 404
        assert json.loads(theirs.content.replace(asked.encode(), b"<id>")) == json.loads(
            unknown.content.replace(unknown.request["PATH_INFO"].split("/")[-1].encode(), b"<id>")
        )


def test_batches_have_a_rate_limit_of_their_own(api: LinkClient, settings: Any) -> None:
    settings.RATE_LIMIT_LINK_BATCH = "2/min"
    settings.RATE_LIMIT_LINK_CREATE = "1/min"
    assert accepted(api.post_batch({"requests": [item("l0"), item("l1")]}, key="L0"))
    assert accepted(api.post_batch({"requests": [item("l2")]}, key="L1"))
    assert_rate_limited(api.post_batch({"requests": [item("l3")]}, key="L2"), period=60)
    assert api.post_link(link_body(), key="single").status_code == 202


def test_distinct_items_are_one_statement(
    api: LinkClient, django_assert_max_num_queries: Any
) -> None:
    """Items with a key and a patient of their own go in statements.ACCEPT together: the
    batch costs the same few queries whatever its size (its lock, replay check and record)."""
    api.post_batch({"requests": [item("warm")]}, key="warm")
    items = [item(f"q{n}") for n in range(300)]
    with django_assert_max_num_queries(10):
        body = accepted(api.post_batch({"requests": items}))
    assert body["accepted"] == 300


def test_an_item_of_the_batch_writes_what_post_link_writes(api: LinkClient) -> None:
    single = api.post_link(link_body(), key="alone").json()["workflow-id"]
    batched = accepted(api.post_batch({"requests": [item("in-batch")]}))
    rows = [_rows(single), _rows(batched["items"][0]["workflow-id"])]
    for written in rows:
        written["workflow"].pop("patient_id")
        written["request"]["patient"].pop("id")
        written["record"].pop("key")
        written["record"].pop("fingerprint")
    assert rows[0] == rows[1]


def test_one_items_webhook_refusal_is_its_own(api: LinkClient) -> None:
    """Items are validated by one serializer in turn: what one item's webhook was refused for
    must not refuse the next."""
    refused = {**item("hook-0"), "webhook": "https://elsewhere.example/hooks"}
    body = accepted(api.post_batch({"requests": [refused, item("hook-1"), item("hook-2")]}))
    first = body["items"][0]["problem"]
    assert first["type"] == "/problems/webhook-url-refused", first
    assert first["errors"][0]["field"] == "webhook"
    assert ["workflow-id" in i for i in body["items"]] == [False, True, True]


def test_a_batch_record_is_purged_after_its_retention(api: LinkClient, settings: Any) -> None:
    settings.LINK_BATCH_RETENTION_DAYS = 30
    old = accepted(api.post_batch({"requests": [item("old")]}, key="old-batch"))
    new = accepted(api.post_batch({"requests": [item("new")]}, key="new-batch"))
    LinkBatch.objects.filter(id=old["batch-id"]).update(
        created_at=timezone.now() - dt.timedelta(days=30, seconds=1)
    )
    assert purge_idempotency_records() == 1  # the beat task: the old batch only
    assert api.batch(old["batch-id"]).status_code == 404
    assert api.batch(new["batch-id"]).status_code == 200
    # Its workflow stays, readable by its own id.
    assert api.status(old["items"][0]["workflow-id"]).status_code == 200
