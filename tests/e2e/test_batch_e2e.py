"""POST /link/batch end to end (issue 19, item 4): the real worker takes every accepted item as
it takes a POST /link, each to its own end and webhook; GET /link/batch follows them."""

from collections.abc import Iterator
from typing import Any

import pytest

from merchant.services import CustomerCredentials, customer_onboard
from standin.receiver import ReceiverServer
from tests.conftest import LinkClient, link_body
from tests.e2e.conftest import wait_until
from tests.e2e.test_processing import AMBIGUOUS, NO_MATCH, delivered, verify

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def customer(receiver: ReceiverServer, standin: Any) -> Iterator[CustomerCredentials]:
    credentials = customer_onboard(name="Batch Health", webhook_url=f"{receiver.url}/hooks")
    receiver.state.secret = credentials.customer.webhook_secret
    yield credentials
    receiver.state.secret = None


def test_a_batch_ends_every_item_with_its_own_webhook(
    customer: CustomerCredentials, receiver: ReceiverServer
) -> None:
    client = LinkClient(customer.token)
    bodies = [link_body() for _ in range(8)] + [link_body(**NO_MATCH), link_body(**AMBIGUOUS)]
    items: list[dict[str, Any]] = [
        {"idempotency-key": f"e2e-{n}", **body} for n, body in enumerate(bodies)
    ]
    items.append({"idempotency-key": "thin", **link_body(full_name="Test Patient")})
    response = client.client.post(
        "/link/batch",
        {"requests": items},
        format="json",
        HTTP_CUSTOMER_TOKEN=client.token,
        HTTP_IDEMPOTENCY_KEY="e2e-batch",
    )
    assert response.status_code == 202, response.content
    answer = response.json()
    assert (answer["accepted"], answer["refused"]) == (10, 1)

    def settled() -> dict[str, Any] | None:
        report: dict[str, Any] = client.batch(answer["batch-id"]).json()
        return report if report["by-status"] in ({"COMPLETED": 9, "REVIEW": 1},) else None

    report = wait_until(settled, timeout=30, what="every item at its end")
    assert report["total"] == 11
    results = [item.get("result") for item in report["items"]]
    assert results == ["LINKED"] * 8 + ["NO_RESULTS", None, None]
    assert report["items"][10]["problem"]["type"] == "/problems/insufficient-demographics"
    # Each ended item told by its own signed webhook, once.
    for item in report["items"][:9]:
        [delivery] = delivered(receiver, item["workflow-id"])
        payload = verify(customer, delivery)
        assert payload["type"] == "link.completed"
        assert payload["data"]["result"] == item["result"]
