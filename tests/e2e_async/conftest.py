"""The real stack for the asynchronous internal search (contract section 2), end to end.

gunicorn serves the real web app, so the FHIR stand-in's signed result callback reaches a real
HTTP server; a Celery worker and beat run as processes with INTERNAL_SEARCH_ASYNC=true and the
short settings of tests/e2e (the sweep runs every second and re-queues after 5 s). In threads of
this process: the stand-in, the customer's webhook receiver, and a "gate" between the stand-in
and gunicorn that forwards, refuses or holds the callbacks, so that each test chooses whether
the result arrives by callback, by the sweep's poll, or by both in a race.

Everything binds 127.0.0.1 on free ports and uses the test database and the test Redis
database (REDIS_URL, read from this process's environment by tests.processes.child_env).
"""

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from merchant.services import CustomerCredentials, customer_onboard
from standin.receiver import ReceiverServer, make_receiver
from standin.server import StandinServer, make_server
from tests.e2e.conftest import E2E_SETTINGS, control_root
from tests.processes import (
    celery_beat_args,
    celery_worker_args,
    child_env,
    gunicorn,
    running,
    serving,
    wait_for_text,
)

# The secret the stand-in signs its callbacks with and the service verifies them with.
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"e2e-async-internal-callback-key!").decode()
# How long a finished stand-in job waits before its callback (the stand-in's start-up value,
# restored by /_control/reset before every test).
ASYNC_DELAY_MS = 300
CALLBACK_PATH = "/internal/search-results/"
# A held callback is released at the latest after this long, so a failing test cannot hang.
HOLD_LIMIT_SECONDS = 60
FORWARDED_HEADERS = ("content-type", "webhook-id", "webhook-timestamp", "webhook-signature")


@dataclass(frozen=True)
class Forwarded:
    """One callback the gate passed on to gunicorn, and gunicorn's answer."""

    search_id: str
    mode: str
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class GateState:
    mode: str = "forward"
    release: threading.Event = field(default_factory=threading.Event)
    arrived: list[tuple[str, str]] = field(default_factory=list)  # (search id, mode)
    forwarded: list[Forwarded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Gate(ThreadingHTTPServer):
    """Between the stand-in and gunicorn's /internal/search-results/<id>. Modes:

    - "forward": pass the callback on at once (method, body, content-type, webhook-* headers);
    - "refuse": answer 503 without passing it on (the callback never lands);
    - "hold": keep it until `release_held()`, then pass it on.
    Every forwarded callback's upstream answer is recorded.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.upstream = ""
        self.state = GateState()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def set_mode(self, mode: str) -> None:
        assert mode in ("forward", "refuse", "hold"), mode
        with self.state.lock:
            self.state.mode = mode

    def release_held(self) -> None:
        with self.state.lock:
            self.state.release.set()

    def reset(self) -> None:
        """Back to "forward"; callbacks still held are let go (they may hit the next test)."""
        with self.state.lock:
            self.state.mode = "forward"
            self.state.release.set()
            self.state.release = threading.Event()
            self.state.arrived.clear()
            self.state.forwarded.clear()

    def arrived(self, search_id: str, mode: str | None = None) -> int:
        with self.state.lock:
            return sum(1 for sid, m in self.state.arrived if sid == search_id and mode in (None, m))

    def forwarded(self, search_id: str) -> list[Forwarded]:
        with self.state.lock:
            return [f for f in self.state.forwarded if f.search_id == search_id]

    def _arrive(self, search_id: str) -> tuple[str, threading.Event]:
        with self.state.lock:
            self.state.arrived.append((search_id, self.state.mode))
            return self.state.mode, self.state.release

    def _record(self, forwarded: Forwarded) -> None:
        with self.state.lock:
            self.state.forwarded.append(forwarded)


class _GateHandler(BaseHTTPRequestHandler):
    server: Gate

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        search_id = self.path.removeprefix(CALLBACK_PATH).split("?", 1)[0]
        mode, release = self.server._arrive(search_id)
        if mode == "refuse":
            self._answer(503, b'{"error": "refused by the gate"}', "application/json")
            return
        if mode == "hold":
            release.wait(HOLD_LIMIT_SECONDS)
        headers = {
            name: value for name, value in self.headers.items() if name.lower() in FORWARDED_HEADERS
        }
        try:
            upstream = requests.request(
                self.command,
                f"{self.server.upstream}{self.path}",
                data=body,
                headers=headers,
                timeout=10,
                allow_redirects=False,
            )
            status, content = upstream.status_code, upstream.content
            content_type = upstream.headers.get("Content-Type", "")
        except requests.RequestException as exc:
            status, content, content_type = 502, type(exc).__name__.encode(), "text/plain"
        self.server._record(Forwarded(search_id, mode, status, content, content_type))
        self._answer(status, content, content_type)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the stand-in's callback timed out while the gate held it

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class AsyncStack:
    base: str  # gunicorn
    gate: Gate
    standin: StandinServer
    receiver: ReceiverServer
    logs: Path

    @property
    def beat_log(self) -> Path:
        return self.logs / "beat.log"

    @property
    def worker_log(self) -> Path:
        return self.logs / "worker.log"


@pytest.fixture(scope="package")
def async_stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsyncStack]:
    logs = tmp_path_factory.mktemp("e2e_async")
    gate = Gate()
    standin = make_server(
        "127.0.0.1",
        0,
        async_delay_ms=ASYNC_DELAY_MS,
        callback_url=f"{gate.url}{CALLBACK_PATH}{{search_id}}",
        callback_secret=CALLBACK_SECRET,
    )
    receiver = make_receiver()
    with ExitStack() as stack:
        for server in (gate, standin, receiver):
            stack.enter_context(serving(server))
        # Held callbacks are let go before the gate's shutdown waits for its threads.
        stack.callback(gate.reset)
        with django_db_blocker.unblock():
            env = child_env(
                INTERNAL_SEARCH_URL=standin.base_url,
                INTERNAL_SEARCH_ASYNC="true",
                INTERNAL_CALLBACK_SECRET=CALLBACK_SECRET,
                LOG_LEVEL="INFO",
                **E2E_SETTINGS,
            )
        base = stack.enter_context(gunicorn(env, (logs / "gunicorn.log").open("wb")))
        gate.upstream = base
        worker_log = logs / "worker.log"
        beat_log = logs / "beat.log"
        stack.enter_context(running(celery_worker_args(), env=env, log=worker_log.open("wb")))
        stack.enter_context(
            # LOG_LEVEL=DEBUG: beat's line per task sent, by which tests count the sweeps.
            running(
                celery_beat_args(logs / "beat-schedule"),
                env={**env, "LOG_LEVEL": "DEBUG"},
                log=beat_log.open("wb"),
            )
        )
        wait_for_text(worker_log, "ready.")
        wait_for_text(beat_log, "beat: Starting")
        yield AsyncStack(base, gate, standin, receiver, logs)


@pytest.fixture
def standin(async_stack: AsyncStack) -> Iterator[StandinServer]:
    server = async_stack.standin
    requests.post(f"{control_root(server)}/_control/reset", timeout=5).raise_for_status()
    yield server


@pytest.fixture
def gate(async_stack: AsyncStack) -> Iterator[Gate]:
    async_stack.gate.reset()
    yield async_stack.gate
    async_stack.gate.reset()


@pytest.fixture
def receiver(async_stack: AsyncStack) -> Iterator[ReceiverServer]:
    server = async_stack.receiver
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def customer(
    receiver: ReceiverServer, standin: StandinServer, gate: Gate
) -> Iterator[CustomerCredentials]:
    credentials = customer_onboard(name="E2E Async Health", webhook_url=f"{receiver.url}/hooks")
    receiver.state.secret = credentials.customer.webhook_secret
    yield credentials
    receiver.state.secret = None


def standin_config(server: StandinServer, **changes: Any) -> dict[str, Any]:
    response = requests.post(f"{control_root(server)}/_control/config", json=changes, timeout=5)
    response.raise_for_status()
    config: dict[str, Any] = response.json()
    return config


def standin_complete_jobs(server: StandinServer) -> int:
    response = requests.post(f"{control_root(server)}/_control/complete-jobs", timeout=5)
    response.raise_for_status()
    completed: int = response.json()["completed"]
    return completed
