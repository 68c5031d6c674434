"""A worker's task sends the webhook of the ending it committed itself (no second Celery task);
elsewhere the webhook is queued as a task; beat is the fallback either way."""

from typing import Any

import pytest
import redis

from merchant.models import Customer
from standin.receiver import ReceiverServer
from tests.conftest import broker_messages
from tests.workflows.test_webhooks import customer, delivery_of, finished, receiver  # noqa: F401
from workflows.models import DeliveryStatus
from workflows.services.webhooks import webhooks_sent_here

pytestmark = pytest.mark.django_db(transaction=True)  # on_commit runs on a real commit


@pytest.fixture(autouse=True)
def webhook_settings(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True


def test_inside_the_block_the_task_sends_it_itself(
    customer: Customer,  # noqa: F811
    receiver: ReceiverServer,  # noqa: F811
    redis_db: redis.Redis,
) -> None:
    with webhooks_sent_here():
        workflow = finished(customer)
        assert receiver.deliveries() == []  # not before the block ends
    delivery = delivery_of(workflow)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1
    assert [d.json()["data"]["workflow-id"] for d in receiver.deliveries()] == [str(workflow.id)]
    assert broker_messages(redis_db) == []  # no deliver_webhook task


def test_outside_the_block_a_task_is_queued(
    customer: Customer,  # noqa: F811
    receiver: ReceiverServer,  # noqa: F811
    redis_db: redis.Redis,
) -> None:
    workflow = finished(customer)
    messages = broker_messages(redis_db)
    assert [(m["task"], m["args"]) for m in messages] == [
        ("workflows.deliver_webhook", [delivery_of(workflow).id])
    ]
    assert receiver.deliveries() == []


def test_a_block_that_raises_leaves_it_to_beat(
    customer: Customer,  # noqa: F811
    receiver: ReceiverServer,  # noqa: F811
    redis_db: redis.Redis,
) -> None:
    with pytest.raises(RuntimeError), webhooks_sent_here():
        workflow = finished(customer)
        raise RuntimeError("the task died after the commit")
    delivery = delivery_of(workflow)
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 0
    assert receiver.deliveries() == [] and broker_messages(redis_db) == []
