"""The service for `make fuzz`: a fresh database, its own redis-server, gunicorn; all stopped by
pid and the database dropped afterwards, whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dj_database_url
import psycopg
from psycopg import sql

from tests.fuzz.driver import REGISTERED_WEBHOOK_URL, callback_secret, server_settings
from tests.processes import BIN, ROOT, free_port, gunicorn, running

WEBHOOK_URL = ["--webhook-url", REGISTERED_WEBHOOK_URL]


@dataclass(frozen=True)
class FuzzTarget:
    base_url: str
    token: str
    secret: str
    log: Path


def _admin_params(database_url: str) -> dict[str, Any]:
    db = dj_database_url.parse(database_url)
    return {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "dbname": "postgres",
        "connect_timeout": 5,
    }


def _with_name(database_url: str, name: str) -> str:
    base, _, _old = database_url.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def _fresh_database(database_url: str) -> Iterator[str]:
    name = f"merchant_fuzz_{os.getpid()}"
    params = _admin_params(database_url)
    with psycopg.connect(autocommit=True, **params) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_name(database_url, name)
    finally:
        with psycopg.connect(autocommit=True, **params) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def _redis(workdir: Path) -> Iterator[str]:
    """A redis-server of its own (broker, cache, rate counters): nothing of the run is left in
    a shared Redis."""
    port = free_port()
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    args += ["--appendonly", "no", "--dir", str(workdir)]
    with running(args, env=dict(os.environ)):
        deadline = time.monotonic() + 10
        while subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True
        ).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def fuzz_target() -> Iterator[FuzzTarget]:
    """gunicorn on a free port over a fresh, migrated database, and one onboarded customer."""
    database_url = os.environ.get("DATABASE_URL", "postgres://127.0.0.1:5432/merchant")
    secret = callback_secret()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-stack-")))
        redis_url = stack.enter_context(_redis(workdir))
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "DATABASE_URL": stack.enter_context(_fresh_database(database_url)),
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
