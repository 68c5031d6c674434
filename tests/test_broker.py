"""The Redis broker's transport (config/broker.py): one redis-py client per channel, shared by
every command kombu sends outside the event loop and replaced with its pool; messages still
arrive once each, and acks still clear kombu's unacknowledged-message bookkeeping."""

import subprocess
import sys
import threading
import uuid
from typing import Any

import redis
from django.conf import settings
from kombu import Connection, Consumer, Exchange, Producer, Queue

from config.broker import RedisChannel, RedisTransport
from config.celery import app
from tests.processes import child_env


def test_the_app_uses_it_for_a_redis_broker() -> None:
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, RedisTransport)
        assert isinstance(connection.default_channel, RedisChannel)


def _transport_of(broker_url: str) -> str:
    code = "from config.celery import app; print(app.connection_for_write().transport_cls)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(DJANGO_SETTINGS_MODULE="config.settings_test", CELERY_BROKER_URL=broker_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_rediss_and_rabbitmq_keep_kombus_own_transports() -> None:
    # kombu derives TLS defaults from the transport's name (rediss); RabbitMQ is another one.
    assert _transport_of("rediss://127.0.0.1:6379/0") == "rediss"
    assert _transport_of("amqp://guest:guest@127.0.0.1:5672//") == "amqp"
    assert _transport_of("redis://127.0.0.1:6379/0") == "config.broker:RedisTransport"


def test_one_client_per_channel_replaced_with_its_pool() -> None:
    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel: Any = connection.channel()
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:
            assert client is first
        # The event loop's clients are kombu's own, as before.
        assert channel._create_client(asynchronous=True) is not first
        channel._disconnect_pools()  # what kombu does after a fork
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.ping()
        channel.close()


def test_messages_from_several_threads_arrive_once_and_acks_clear_the_bookkeeping(
    redis_db: redis.Redis,
) -> None:
    name = f"test-broker-{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="direct")
    queue = Queue(name, exchange, routing_key=name)
    threads, per_thread = 4, 50
    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel: Any = connection.channel()
        queue(channel).declare()
        errors: list[BaseException] = []

        def publish(thread: int) -> None:
            try:  # one producer per thread, all on the channel's one client
                producer = Producer(channel, exchange=exchange, routing_key=name)
                for index in range(per_thread):
                    producer.publish({"n": f"{thread}-{index}"}, serializer="json")
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        assert errors == []
        assert redis_db.llen(name) == threads * per_thread

        received: list[str] = []

        def on_message(body: dict[str, str], message: Any) -> None:
            received.append(body["n"])
            message.ack()

        with Consumer(channel, queues=[queue], callbacks=[on_message]):
            while len(received) < threads * per_thread:
                connection.drain_events(timeout=5)
        assert sorted(received) == sorted(
            f"{t}-{i}" for t in range(threads) for i in range(per_thread)
        )
        # kombu keeps every delivered, unacknowledged message in these two keys (to restore it
        # if the consumer dies): every ack went through.
        assert redis_db.hlen("unacked") == 0
        assert redis_db.zcard("unacked_index") == 0
        assert redis_db.llen(name) == 0
        channel.close()


def test_replies_are_parsed_by_hiredis() -> None:
    # redis[hiredis] is locked: redis-py parses replies in C when it can import it, and says
    # nothing when it cannot (the pure-Python parser was ~15% slower per kombu pipeline here).
    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel: Any = connection.channel()
        pool = channel._create_client().connection_pool
        held = pool.get_connection()
        try:
            assert type(held._parser).__name__ == "_HiredisParser"
        finally:
            pool.release(held)
        channel.close()
