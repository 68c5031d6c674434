"""The service for `make fuzz`: a fresh database, its own redis-server, gunicorn; all stopped by
pid and the database dropped afterwards, whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.driver import REGISTERED_WEBHOOK_URL, callback_secret, server_settings
from tests.processes import BIN, ROOT, fresh_database, gunicorn, redis_server

WEBHOOK_URL = ["--webhook-url", REGISTERED_WEBHOOK_URL]


@dataclass(frozen=True)
class FuzzTarget:
    base_url: str
    token: str
    secret: str
    log: Path


@contextmanager
def fuzz_target() -> Iterator[FuzzTarget]:
    """gunicorn on a free port over a fresh, migrated database, and one onboarded customer."""
    database_url = os.environ.get("DATABASE_URL", "postgres://127.0.0.1:5432/merchant")
    secret = callback_secret()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-stack-")))
        redis_url = stack.enter_context(redis_server(workdir))
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "DATABASE_URL": stack.enter_context(
                fresh_database(database_url, prefix="merchant_fuzz")
            ),
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            **server_settings(secret),
        }
        manage = [str(BIN / "python"), "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
        onboarded = subprocess.run(
            [*manage, "onboard_customer", "--name", "Fuzz Health", "--json", *WEBHOOK_URL],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        token = json.loads(onboarded.stdout)["token"]
        log = workdir / "gunicorn.log"
        base_url = stack.enter_context(gunicorn(env, stack.enter_context(log.open("wb"))))
        yield FuzzTarget(base_url=base_url, token=token, secret=secret, log=log)
