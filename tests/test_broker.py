"""The broker's transport: kombu's own for every scheme, and redis-py parsing in C.

(A transport of our own that shared one redis-py client per channel, config/broker.py, was
deleted once messages carried batches: `make bench` measured the Celery workers' CPU per
workflow at 2.46 / 2.44 ms with it and 2.38 ms with kombu's own: the runs listed in
`git show 4a74b8c:README.md`, "Performance".)
"""

import subprocess
import sys
from typing import Any

from django.conf import settings
from kombu import Connection

from tests.processes import child_env


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


def test_every_scheme_uses_kombus_own_transport() -> None:
    assert _transport_of("redis://127.0.0.1:6379/0") == "redis"
    # kombu derives TLS defaults from the transport's name (rediss); RabbitMQ is another one.
    assert _transport_of("rediss://127.0.0.1:6379/0") == "rediss"
    assert _transport_of("amqp://guest:guest@127.0.0.1:5672//") == "amqp"


def test_replies_are_parsed_by_hiredis() -> None:
    # redis[hiredis] is locked: redis-py parses replies in C when it can import it, and says
    # nothing when it cannot (the pure-Python parser was ~15% slower per kombu pipeline here).
    with Connection(settings.CELERY_BROKER_URL) as connection:
        channel: Any = connection.channel()
        pool = channel._create_client().connection_pool
        held = pool.get_connection()
        try:
            assert type(held._parser).__name__ == "_HiredisParser"
        finally:
            pool.release(held)
        channel.close()
