"""The one process harness of the tests, chaos, fuzz and bench suites: real processes (gunicorn,
Celery workers and beat, the stand-in, a redis-server of its own) and a fresh database. Each
process runs in its own process group, writes to a log file, is waited for by what it prints
(a failure shows the log's tail), and is stopped by its group afterwards (or the database
dropped). The suites configure what they start; none starts a process another way."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import dj_database_url
import psycopg
import requests
from django.db import connection
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    """DATABASE_URL of the database pytest-django created, for processes the test starts."""
    db = connection.settings_dict
    host = db["HOST"] or "127.0.0.1"
    port = db["PORT"] or "5432"
    user = f"{db['USER']}@" if db["USER"] else ""
    return f"postgres://{user}{host}:{port}/{db['NAME']}"


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings_test",
            "DATABASE_URL": test_database_url(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@contextmanager
def running(
    args: list[str], *, env: dict[str, str], log: IO[bytes] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process in its own process group; stop the whole group afterwards."""
    proc = _popen(args, env=env, out=log)
    try:
        yield proc
    finally:
        stop_group(proc)


def _popen(
    args: list[str], *, env: dict[str, str], out: IO[bytes] | None
) -> subprocess.Popen[bytes]:
    """`args` from the repository root, in a process group of its own (so that stopping the
    group stops its children too), its output to `out` (none without)."""
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=out or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


class ProcessFailed(RuntimeError):
    """A process exited, or did not get ready in time; the message ends with its log's tail."""


@dataclass
class Process:
    """A process the harness started: its own process group, stdout and stderr in `log`."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    # Stopped on purpose (the chaos suite's kills): a supervisor leaves it down.
    expected_down: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return _tail(self.log, chars)

    def wait_for(self, text: str, *, timeout: float = 60) -> None:
        """Wait until the log shows `text`: ProcessFailed with the tail if the process exits
        first, TimeoutError with it if the time runs out."""
        wait_for_text(self.log, text, timeout=timeout, exited=lambda: not self.alive())

    def stop(self, timeout: float = 10) -> None:
        stop_group(self.popen, timeout)


def spawn(name: str, args: list[str], *, env: dict[str, str], log: Path) -> Process:
    """Start `args` (see _popen), appending its output to `log`."""
    with log.open("ab") as handle:
        popen = _popen(args, env=env, out=handle)
    return Process(name, args, log, popen)


def wait_http(url: str, *, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=5)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def gunicorn(env: dict[str, str], log: IO[bytes] | None = None) -> Iterator[str]:
    """gunicorn serving the project on a free port; yields its base URL."""
    port = free_port()
    args = [
        str(BIN / "gunicorn"),
        "config.wsgi",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--timeout",
        "30",
    ]
    with running(args, env=env, log=log):
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/problems/not-found")
        yield base


def wait_for_text(
    path: Path, text: str, *, timeout: float = 30, exited: Callable[[], bool] | None = None
) -> None:
    """Wait until a process's log file contains `text`; with `exited`, ProcessFailed as soon
    as it says the process is gone. Both failures end with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if exited is not None and exited():
            raise ProcessFailed(f"{path.stem} exited:\n{_tail(path)}")
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s:\n{_tail(path)}")


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def celery_worker_args(
    *, concurrency: int = 4, name: str = "worker", pool: str = "threads"
) -> list[str]:
    return [
        str(BIN / "celery"),
        "-A",
        "config",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{name}@%h",
    ]


def celery_beat_args(schedule_file: Path) -> list[str]:
    # The tests use beat's file scheduler: the same CELERY_BEAT_SCHEDULE entries, without
    # django-celery-beat rows that the transactional tests' flush would wipe.
    return [
        str(BIN / "celery"),
        "-A",
        "config",
        "beat",
        "--loglevel",
        "INFO",
        "--scheduler",
        "celery.beat:PersistentScheduler",
        "--schedule",
        str(schedule_file),
        "--pidfile",
        "",
    ]


@contextmanager
def serving(server: Any) -> Iterator[None]:
    """Serve an HTTP server (stand-in, receiver) on a thread of this process, then close it."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def admin_params(database_url: str) -> dict[str, Any]:
    """psycopg connection parameters for the maintenance database of `database_url`'s server."""
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
def fresh_database(database_url: str, *, prefix: str) -> Iterator[str]:
    """An empty database `<prefix>_<pid>` on the server of `database_url`; yields its URL and
    drops it afterwards (WITH FORCE: a process left connected cannot keep it)."""
    name = f"{prefix}_{os.getpid()}"
    params = admin_params(database_url)
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
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (no persistence); yields its URL. Nothing of
    the run is left in a shared Redis."""
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
