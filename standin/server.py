"""HTTP front of the stand-in: routing, bearer auth, injected latency/failures/outages, logs."""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from standin import fhir
from standin.matching import load_patients, rank
from standin.state import Config, State
from standin.webhooks import WebhookSender

DEFAULT_DATA = Path(__file__).with_name("patients.json")
FHIR_JSON = "application/fhir+json"
PLAIN_JSON = "application/json"
MAX_BODY_BYTES = 1 << 20
MATCH_PATH = "/fhir/Patient/$match"
METADATA_PATH = "/fhir/metadata"
# How long a "hang" outage holds a call at most: a scenario that forgets to clear the outage
# (or dies) must not leave handler threads and client connections parked for ever.
HANG_MAX_SECONDS = 120.0
CONTROL_PREFIX = "/_control/"
_READ_PATH = re.compile(r"^/fhir/Patient/([A-Za-z0-9.\-]{1,64})$")
_JOB_PATH = re.compile(r"^/fhir/\$match-jobs/([0-9a-f]{32})$")


@dataclass
class Response:
    status: int
    body: Any = None
    content_type: str = FHIR_JSON
    headers: dict[str, str] = field(default_factory=dict)


def _outcome(status: int, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, fhir.operation_outcome(status, diagnostics), headers=headers or {})


def _control_error(status: int, message: str) -> Response:
    return Response(status, {"error": message}, PLAIN_JSON)


def _not_allowed(allowed: str) -> Response:
    return _outcome(405, f"method not allowed; use {allowed}", {"Allow": allowed})


def _sleep_ms(milliseconds: int) -> None:
    if milliseconds > 0:
        time.sleep(milliseconds / 1000)


def _prefers_async(prefer_header: str) -> bool:
    tokens = (part.strip().lower() for part in re.split(r"[,;]", prefer_header))
    return "respond-async" in tokens


def _call_kind(path: str) -> str:
    """Which kind of FHIR call a path is (standin.state.CALL_KINDS), for the outage counts."""
    if path == METADATA_PATH:
        return "metadata"
    if path == MATCH_PATH:
        return "match"
    if _JOB_PATH.match(path):
        return "poll"
    if _READ_PATH.match(path):
        return "read"
    return "other"


class _Rejected(Exception):
    """Raised while reading a request that must be refused before routing."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Hang(Exception):
    """Raised by routing when a "hang" outage is on: the call gets no answer at all."""


class QuietDisconnects:
    """socketserver prints a traceback for every exception in a handler thread. A client that
    went away mid-connection (a killed worker's kept-alive connection: ECONNRESET on the next
    read) is no fault of the server's; anything else still prints."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[misc]


class StandinServer(QuietDisconnects, ThreadingHTTPServer):
    # Handler threads must not keep the process (or a test run) alive after shutdown.
    daemon_threads = True
    # socketserver's listen backlog is 5: a burst of new connections (a batch's searches from a
    # freshly started worker) lost SYNs past it and hit the client's 1 s connect timeout. A real
    # FHIR server's backlog is the kernel's default.
    request_queue_size = 4096

    # Explicit although HTTPServer already sets it: an outage scenario stops the stand-in and
    # starts a new one on the same port at once, which SO_REUSEADDR allows while the old
    # connections sit in TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        # Set before binding: a failed bind calls server_close() from inside
        # TCPServer.__init__, which needs them (else an AttributeError hides "address in use").
        self.state = state
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # CapabilityStatement.date: when this instance came up (FHIR dateTime, with a zone).
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        super().__init__(address, StandinHandler)

    @property
    def base_url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}/fhir"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        # Forget the socket before it is closed, so server_close never touches a closed one.
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and drop every open connection, as a dying process would.

        Handler threads are daemons that are not joined, so without this a client's kept-alive
        connection would go on being answered by a stopped server, and "the internal system
        refuses connections" would only hold for new ones."""
        self.state.close()
        super().server_close()
        with self._connections_lock:
            for connection in self._connections:
                # shutdown, not close: the handler thread still owns the descriptor; its blocked
                # read returns EOF and it closes the socket itself. OSError: the client left.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


class StandinHandler(BaseHTTPRequestHandler):
    server: StandinServer
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: with Nagle on, the body waited for the
    # client's delayed ACK, ~40 ms per keep-alive request on loopback (a search answered "after
    # 50 ms" took ~90).
    disable_nagle_algorithm = True
    server_version = "standin/1"

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own log; _handle writes one data-free line per request."""

    def _handle(self) -> None:
        started = time.monotonic()
        raw_path = urlsplit(self.path).path
        path = unquote(raw_path)
        try:
            response = self._route(path)
        except _Rejected as rejected:
            response = rejected.response
        except _Hang:
            self._hang(raw_path, started)
            return
        except Exception as exc:
            # A stand-in bug must surface as a clean 500, never as a stack trace to the client.
            print(f"standin: internal error {type(exc).__name__}", file=sys.stderr, flush=True)
            response = _outcome(500, "internal stand-in error")
        # Record and log before answering, so a client that reads /_control/stats right after
        # its response always finds its own request there.
        if not path.startswith(CONTROL_PREFIX):
            self.server.state.record_request(self.command, path, response.status)
        elapsed_ms = round((time.monotonic() - started) * 1000)
        # The raw path has no whitespace (it came from the request line) and no query string,
        # so the line can neither be forged nor carry demographics.
        print(
            f"standin: {self.command} {raw_path} {response.status} {elapsed_ms}ms",
            file=sys.stderr,
            flush=True,
        )
        self._send(response)

    def _hang(self, raw_path: str, started: float) -> None:
        """Hold the call unanswered while the "hang" outage lasts, then drop the connection.

        Waiting here blocks only this connection's thread (the server is threaded), so the
        control API that ends the outage keeps answering."""
        self.server.state.hold_while_hanging(HANG_MAX_SECONDS)
        # No answer was written, so the connection cannot carry another request.
        self.close_connection = True
        self.server.state.record_request(self.command, unquote(raw_path), None)
        elapsed_ms = round((time.monotonic() - started) * 1000)
        print(
            f"standin: {self.command} {raw_path} no-answer {elapsed_ms}ms",
            file=sys.stderr,
            flush=True,
        )

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _Rejected(_outcome(400, "invalid Content-Length"))
        if length > MAX_BODY_BYTES:
            # The unread body would be parsed as the next request, so drop the connection.
            self.close_connection = True
            raise _Rejected(_outcome(413, f"body larger than {MAX_BODY_BYTES} bytes"))
        return self.rfile.read(length)

    def _send(self, response: Response) -> None:
        payload = b"" if response.body is None else json.dumps(response.body).encode()
        try:
            self.send_response(response.status)
            if payload:
                self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (e.g. its timeout fired during injected latency).
            self.close_connection = True

    def _base_url(self) -> str:
        # Prefer the Host the client used so URLs stay valid behind port mapping or proxies.
        host = self.headers.get("Host")
        return f"http://{host}/fhir" if host else self.server.base_url

    def _authorised(self, token: str) -> bool:
        presented = self.headers.get("Authorization", "")
        return hmac.compare_digest(presented.encode(), f"Bearer {token}".encode())

    def _route(self, path: str) -> Response:
        body = self._read_body()
        state = self.server.state
        # Before the token check: a system that is down (a proxy's 503, a hung process) answers
        # everyone alike. The control API is the harness's, never part of the outage.
        if not path.startswith(CONTROL_PREFIX):
            outage = state.outage_for_call(_call_kind(path))
            if outage == "503":
                # No Retry-After: a real outage rarely announces when it will end.
                return _outcome(503, "internal system unavailable (injected outage)")
            if outage == "hang":
                raise _Hang
        if state.token and not self._authorised(state.token):
            return _outcome(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        if path.startswith(CONTROL_PREFIX):
            return self._control(path.removeprefix(CONTROL_PREFIX), body)
        if path == METADATA_PATH:
            return self._metadata() if self.command == "GET" else _not_allowed("GET")
        if path == MATCH_PATH:
            return self._match(body) if self.command == "POST" else _not_allowed("POST")
        if job := _JOB_PATH.match(path):
            return self._poll(job.group(1)) if self.command == "GET" else _not_allowed("GET")
        if read := _READ_PATH.match(path):
            return self._read(read.group(1)) if self.command == "GET" else _not_allowed("GET")
        return _outcome(404, "unknown path")

    def _match(self, body: bytes) -> Response:
        state = self.server.state
        step = state.next_match_behaviour()
        _sleep_ms(state.config.latency_ms + step.delay_ms)
        if step.status != 200:
            headers = {} if step.retry_after is None else {"Retry-After": str(step.retry_after)}
            return _outcome(step.status, f"injected failure (HTTP {step.status})", headers)
        try:
            document = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return _outcome(400, "body is not valid JSON")
        try:
            request = fhir.parse_match_parameters(document)
        except ValueError as exc:
            # Messages name the offending element only, never its value.
            return _outcome(400, str(exc))
        # Searches for some patients slow, the others not (config family_latency_ms).
        _sleep_ms(state.config.latency_for_family(request.query.family))
        patients = state.patients
        matches = rank(request.query, patients.candidates, request.count, request.only_certain)
        bundle = fhir.searchset(self._base_url(), matches, patients.resources)
        if _prefers_async(self.headers.get("Prefer", "")):
            search_id = state.create_job(bundle)
            location = f"{self._base_url()}/$match-jobs/{search_id}"
            return _outcome(202, "accepted; poll Content-Location", {"Content-Location": location})
        return Response(200, bundle)

    def _poll(self, search_id: str) -> Response:
        state = self.server.state
        _sleep_ms(state.config.latency_ms)
        job = state.poll_job(search_id)
        if job is None:
            return _outcome(404, "unknown match job")
        done, bundle = job
        return Response(200, bundle) if done else _outcome(202, "match job in progress")

    def _metadata(self) -> Response:
        # The liveness probe: no injected latency, failures or scripted steps, which are there
        # to shape searches; only an outage (checked in _route) makes it fail.
        self.server.state.count("metadata_calls")
        return Response(200, fhir.capability_statement(self._base_url(), self.server.started_at))

    def _read(self, patient_id: str) -> Response:
        state = self.server.state
        state.count("read_calls")
        resource = state.patients.resources.get(patient_id)
        return _outcome(404, "unknown patient") if resource is None else Response(200, resource)

    def _control(self, action: str, body: bytes) -> Response:
        state = self.server.state
        methods = {"stats": "GET", "script": "POST", "config": "POST"}
        expected = methods.get(action, "POST")
        if action not in (*methods, "reset", "complete-jobs"):
            return _control_error(404, f"unknown control action {action!r}")
        if self.command != expected:
            return _control_error(405, f"use {expected}")
        try:
            payload = json.loads(body) if body else {}
            if action == "stats":
                result: dict[str, Any] = state.stats()
            elif action == "script":
                result = {"queued": state.queue_script(payload)}
            elif action == "config":
                result = asdict(state.set_config(payload))
            elif action == "reset":
                state.reset()
                result = {"reset": True}
            else:
                result = {"completed": state.complete_all_jobs()}
        except ValueError as exc:
            return _control_error(400, str(exc))
        return Response(200, result, PLAIN_JSON)


def make_server(
    host: str = "127.0.0.1",
    port: int = 0,
    data_path: Path | str | None = None,
    latency_ms: int = 0,
    failure_rate: float = 0.0,
    seed: int = 0,
    *,
    async_delay_ms: int = 0,
    token: str | None = None,
    callback_url: str | None = None,
    callback_secret: str | None = None,
    outage: str = "",
) -> StandinServer:
    """Build (but do not start) a server; call ``serve_forever`` on it, e.g. in a thread."""
    config = Config().updated(
        {
            "latency_ms": latency_ms,
            "failure_rate": failure_rate,
            "async_delay_ms": async_delay_ms,
            "outage": outage,
        }
    )
    if bool(callback_url) != bool(callback_secret):
        raise ValueError("callback URL and callback secret must be configured together")
    webhooks = (
        WebhookSender(callback_url, callback_secret) if callback_url and callback_secret else None
    )
    patients = load_patients(Path(data_path) if data_path else DEFAULT_DATA)
    state = State(patients, config, seed, token or None, webhooks)
    return StandinServer((host, port), state)
