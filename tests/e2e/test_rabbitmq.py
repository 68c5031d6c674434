"""The service with RabbitMQ as the Celery broker, against the machine's RabbitMQ.

A stack of its own, so that nothing in it can be done by the Redis-broker stack of the other
end-to-end tests: a fresh database, a redis-server (cache and rate limits only), gunicorn, a
Celery worker and beat, all with CELERY_BROKER_URL=amqp://… and a queue named for this run
(CELERY_TASK_DEFAULT_QUEUE), deleted afterwards. RabbitMQ unreachable is an error, never a skip:
set MERCHANT_TEST_AMQP_URL to use another broker.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
import redis
import requests
from kombu import Connection, Exchange, Queue
from standardwebhooks.webhooks import Webhook

from standin.receiver import ReceiverServer, make_receiver
from standin.server import make_server
from tests.conftest import link_body
from tests.e2e.conftest import E2E_SETTINGS, wait_until
from tests.processes import (
    BIN,
    ROOT,
    celery_beat_args,
    celery_worker_args,
    child_env,
    fresh_database,
    gunicorn,
    redis_server,
    running,
    serving,
    wait_for_text,
)

AMQP_URL = os.environ.get("MERCHANT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbitmq_connection() -> Connection:
    return Connection(AMQP_URL, connect_timeout=3)


@pytest.fixture(scope="module")
def amqp_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # Fails (does not skip) when RabbitMQ is not there: this file exists to prove it works.
    with _rabbitmq_connection() as conn:
        conn.ensure_connection(max_retries=1)
    workdir = tmp_path_factory.mktemp("rabbitmq")
    queue = f"merchant-e2e-{uuid.uuid4().hex[:12]}"
    standin = make_server("127.0.0.1", 0)
    receiver = make_receiver()
    server_url = os.environ.get("DATABASE_URL", "postgres://127.0.0.1:5432/merchant")
    with ExitStack() as stack:
        stack.callback(_delete_queue, queue)
        for server in (standin, receiver):
            stack.enter_context(serving(server))
        redis_url = stack.enter_context(redis_server(workdir))
        database_url = stack.enter_context(fresh_database(server_url, prefix="merchant_rabbit_e2e"))
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": AMQP_URL,
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "INTERNAL_SEARCH_URL": standin.base_url,
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **E2E_SETTINGS,
        }
        manage = [str(BIN / "python"), "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
        hooks = ["--webhook-url", f"{receiver.url}/hooks"]
        onboarded = subprocess.run(
            [*manage, "onboard_customer", "--name", "Rabbit Health", "--json", *hooks],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        customer = json.loads(onboarded.stdout)
        receiver.state.secret = customer["webhook_secret"]
        logs = {name: workdir / f"{name}.log" for name in ("worker", "beat", "web")}
        worker = celery_worker_args(name="rabbit")
        stack.enter_context(running(worker, env=env, log=logs["worker"].open("wb")))
        beat = celery_beat_args(workdir / "beat-schedule")
        stack.enter_context(running(beat, env=env, log=logs["beat"].open("wb")))
        base_url = stack.enter_context(gunicorn(env, stack.enter_context(logs["web"].open("wb"))))
        wait_for_text(logs["worker"], "ready.")
        wait_for_text(logs["beat"], "beat: Starting")
        yield {
            "base_url": base_url,
            "env": env,
            "database_url": database_url,
            "redis_url": redis_url,
            "queue": queue,
            "token": customer["token"],
            "secret": customer["webhook_secret"],
            "receiver": receiver,
            "logs": logs,
        }


def _entities(name: str) -> tuple[Queue, Exchange]:
    """The run's queue and its exchange as Celery declares them (both durable)."""
    exchange = Exchange(name, "direct", durable=True)
    return Queue(name, exchange, routing_key=name, durable=True), exchange


def _delete_queue(name: str) -> None:
    with _rabbitmq_connection() as conn:
        channel = conn.channel()
        queue, exchange = _entities(name)
        queue.bind(channel).delete()
        exchange.bind(channel).delete()


def post_link(base_url: str, token: str) -> str:
    body = link_body()
    response = requests.post(
        f"{base_url}/link",
        json=body,
        headers={"customer-token": token, "Idempotency-Key": body["patient"]["id"]},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    workflow_id: str = response.json()["workflow-id"]
    return workflow_id


def completed(stack: dict[str, Any], workflow_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status: dict[str, Any] = requests.get(
            f"{stack['base_url']}/link/status/{workflow_id}",
            headers={"customer-token": stack["token"]},
            timeout=10,
        ).json()
        return status if status["status"] in ("COMPLETED", "FAILED") else None

    result: dict[str, Any] = wait_until(done, timeout=timeout, what=f"{workflow_id} to end")
    return result


def webhook(stack: dict[str, Any], workflow_id: str) -> dict[str, Any]:
    receiver: ReceiverServer = stack["receiver"]

    def arrived() -> Any:
        found = [d for d in receiver.deliveries() if d.json()["data"]["workflow-id"] == workflow_id]
        return found[0] if found else None

    delivery = wait_until(arrived, what=f"the webhook of {workflow_id}")
    assert delivery.verified is True
    payload: dict[str, Any] = Webhook(stack["secret"]).verify(delivery.body, delivery.headers)
    return payload


def workflow_row(stack: dict[str, Any], workflow_id: str) -> tuple[str, int, list[str]]:
    with psycopg.connect(stack["database_url"].replace("postgres://", "postgresql://", 1)) as db:
        status, requeues = db.execute(
            "SELECT status, requeues FROM workflows_workflow WHERE id = %s", (workflow_id,)
        ).fetchone() or ("", -1)
        actors = [
            actor
            for (actor,) in db.execute(
                "SELECT actor FROM workflows_workflowtransition WHERE workflow_id = %s",
                (workflow_id,),
            )
        ]
    return status, requeues, actors


def test_link_request_completes_over_rabbitmq(amqp_stack: dict[str, Any]) -> None:
    workflow_id = post_link(amqp_stack["base_url"], amqp_stack["token"])
    status = completed(amqp_stack, workflow_id)
    assert (status["status"], status["result"]) == ("COMPLETED", "LINKED")
    payload = webhook(amqp_stack, workflow_id)
    assert payload["type"] == "link.completed"
    assert payload["data"]["workflow-id"] == workflow_id
    # Carried by the worker's dispatcher (on amqp kombu's batch() publishes each message at once,
    # confirmed), not re-queued by the sweep.
    _, requeues, actors = workflow_row(amqp_stack, workflow_id)
    assert requeues == 0 and "sweep" not in actors
    # Everything went through RabbitMQ: the worker consumed there, and the Redis of this stack
    # never held a queue or a kombu binding.
    worker_log = amqp_stack["logs"]["worker"].read_text(errors="replace")
    assert "Connected to amqp://" in worker_log
    cache = redis.Redis.from_url(amqp_stack["redis_url"])
    assert not cache.exists(amqp_stack["queue"])
    assert not list(cache.scan_iter("_kombu*"))


def test_queue_and_exchange_are_durable(amqp_stack: dict[str, Any]) -> None:
    queue = amqp_stack["queue"]
    with _rabbitmq_connection() as conn:
        channel = conn.channel()
        # Declaring an existing queue or exchange with another durability is refused by
        # RabbitMQ (PRECONDITION_FAILED), so this passes only if the worker's are durable.
        _entities(queue)[0].bind(channel).declare()


# link_accept as the API calls it, except that its announcement goes to a channel nobody listens
# on: the dispatcher never hears of the workflow (as when no dispatcher ran at that moment).
_UNANNOUNCED = """
import json, sys
import linking.services.accept as accept
from linking.serializers.links import LinkCreateInputSerializer
from merchant.models import Customer

accept.workflow_announcement = lambda *, workflow_id: ["nobody_listens", "{}"]
customer = Customer.objects.get()
body = json.loads(sys.stdin.read())
serializer = LinkCreateInputSerializer(data=body, context={"customer": customer})
serializer.is_valid(raise_exception=True)
accepted = accept.link_accept(
    customer=customer, idempotency_key="unannounced", body=body,
    request_data=serializer.canonical(),
)
print(accepted.body["workflow-id"])
"""


def test_unannounced_workflow_is_published_by_the_scheduler_over_rabbitmq(
    amqp_stack: dict[str, Any],
) -> None:
    done = subprocess.run(
        [str(BIN / "python"), "manage.py", "shell", "-c", _UNANNOUNCED],
        cwd=ROOT,
        env=amqp_stack["env"],
        input=json.dumps(link_body()),
        capture_output=True,
        text=True,
        check=True,
    )
    workflow_id = done.stdout.strip().splitlines()[-1]
    assert workflow_row(amqp_stack, workflow_id)[0] == "RECEIVED"
    # Nobody heard of it, but it is due: the scheduler's next look (at least every second)
    # publishes it over amqp, long before the sweep's stale window (5 s).
    started = time.monotonic()
    status = completed(amqp_stack, workflow_id, timeout=45)
    assert time.monotonic() - started < 5
    assert (status["status"], status["result"]) == ("COMPLETED", "LINKED")
    _, requeues, actors = workflow_row(amqp_stack, workflow_id)
    assert requeues == 0 and "sweep" not in actors
    assert webhook(amqp_stack, workflow_id)["type"] == "link.completed"


# --- the settings that depend on the broker (no broker needed) ------------------------------

_SHOW = (
    "import json; from django.conf import settings as s; "
    "print(json.dumps([s.CELERY_BROKER_TRANSPORT_OPTIONS, s.CELERY_TASK_DEFAULT_QUEUE]))"
)


def broker_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SHOW],
        env=child_env(DJANGO_SETTINGS_MODULE="config.settings", DEBUG="true", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("url", "options"),
    [
        (
            "redis://127.0.0.1:6379/0",
            {
                "max_connections": 100,
                "socket_connect_timeout": 1,
                "socket_timeout": 2,
                "visibility_timeout": 3600,
            },
        ),
        (AMQP_URL, {"confirm_publish": True, "read_timeout": 2, "write_timeout": 2}),
        ("amqps://user:pw@rabbit.example.com:5671/merchant", {"confirm_publish": True}),
    ],
)
def test_transport_options_follow_the_broker(url: str, options: dict[str, Any]) -> None:
    result = broker_settings(CELERY_BROKER_URL=url, CELERY_TASK_DEFAULT_QUEUE="merchant-tasks")
    assert result.returncode == 0, result.stderr
    got, queue = json.loads(result.stdout)
    assert options.items() <= got.items()
    assert ("visibility_timeout" in got) == url.startswith("redis")
    assert queue == "merchant-tasks"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CELERY_BROKER_URL": AMQP_URL, "CELERY_TASK_TIME_LIMIT": "600"},
            "RABBITMQ_CONSUMER_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT",
        ),
        (
            {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "CELERY_TASK_TIME_LIMIT": "1000"},
            "CELERY_VISIBILITY_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT",
        ),
        ({"CELERY_BROKER_URL": "sqs://"}, "CELERY_BROKER_URL must be"),
    ],
)
def test_unworkable_broker_settings_are_refused(env: dict[str, str], message: str) -> None:
    result = broker_settings(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr


def test_a_longer_consumer_timeout_allows_a_longer_time_limit() -> None:
    # Only the visibility timeout (Redis) or the consumer timeout (RabbitMQ) is checked.
    result = broker_settings(
        CELERY_BROKER_URL=AMQP_URL, CELERY_TASK_TIME_LIMIT="1000", RABBITMQ_CONSUMER_TIMEOUT="4000"
    )
    assert result.returncode == 0, result.stderr
