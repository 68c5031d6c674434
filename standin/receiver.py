"""A customer's webhook receiver, for local runs, the demo and tests.

It records every delivery, answers from a script (500, 410, a redirect, a slow answer...) and,
given the customer's `whsec_` secret, verifies each signature with the `standardwebhooks`
library — the receiver side of Standard Webhooks, as a customer would write it. A POST whose
body ends before its Content-Length (the sender died mid-body) is no delivery: it is recorded
as aborted and answered 400. Unlike the rest of `standin/`, it needs the project's virtualenv
(for `standardwebhooks`).

    python -m standin.receiver --port 9000 --secret whsec_...   # prints each verified delivery

The secret may come from RECEIVER_SECRET instead (the compose stack's `receiver` service).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from standin.server import QuietDisconnects

MAX_BODY_BYTES = 1 << 20


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: str
    received_at: float
    answered: int
    verified: bool | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Aborted:
    """A POST whose sender closed the connection before the whole body arrived (a worker killed
    mid-send): never a delivery, since a body cut short cannot match its signature."""

    path: str
    headers: dict[str, str]
    expected: int  # bytes declared by Content-Length (up to MAX_BODY_BYTES)
    received: int
    received_at: float


@dataclass
class Step:
    status: int = 200
    delay_ms: int = 0
    location: str | None = None


@dataclass
class ReceiverState:
    secret: str | None = None
    # One receiver for several customers, each signing with its own secret: a delivery to one of
    # these paths (its webhook URL's) is verified with that path's secret, any other with
    # `secret`.
    secrets: dict[str, str] = field(default_factory=dict)
    echo: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    aborted: list[Aborted] = field(default_factory=list)
    script: list[Step] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_step(self) -> Step:
        with self.lock:
            return self.script.pop(0) if self.script else Step()


class ReceiverServer(QuietDisconnects, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # as the stand-in's (standin/server.py)

    def __init__(self, address: tuple[str, int], state: ReceiverState) -> None:
        super().__init__(address, _Handler)
        self.state = state

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def respond_with(self, *steps: Step) -> None:
        """Queue answers for the next deliveries, in order; then 200 again."""
        with self.state.lock:
            self.state.script.extend(steps)

    def add_secret(self, path: str, secret: str) -> None:
        """Verify the deliveries to `path` (another customer's webhook URL) with `secret`."""
        with self.state.lock:
            self.state.secrets[path] = secret

    def reset(self) -> None:
        with self.state.lock:
            self.state.script.clear()
            self.state.deliveries.clear()
            self.state.aborted.clear()

    def deliveries(self) -> list[Delivery]:
        with self.state.lock:
            return list(self.state.deliveries)

    def aborted(self) -> list[Aborted]:
        """POSTs cut short by their sender, not counted among the deliveries."""
        with self.state.lock:
            return list(self.state.aborted)


class _Handler(BaseHTTPRequestHandler):
    server: ReceiverServer
    # Keep-alive, as a customer's web server would: one connection carries many deliveries.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        """`GET /_control/stats`: how many deliveries arrived, and how many POSTs were cut short
        (the container healthcheck's probe, docker/healthcheck.py, which reads only the status);
        any other GET is a 404, as on a customer's endpoint."""
        if self.path != "/_control/stats":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        stats = {"deliveries": len(self.server.deliveries()), "aborted": len(self.server.aborted())}
        body = json.dumps(stats).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the rest is never read: the stream is unusable
        expected = min(length, MAX_BODY_BYTES)
        raw = self._read_body(expected)
        state = self.server.state
        if len(raw) < expected:
            self._aborted(expected, len(raw))
            return
        body = raw.decode("utf-8", "replace")
        step = state.next_step()
        if step.delay_ms:
            time.sleep(step.delay_ms / 1000)
        headers = {key.lower(): value for key, value in self.headers.items()}
        verified = None
        with state.lock:
            secret = state.secrets.get(urlsplit(self.path).path, state.secret)
        if secret:
            try:
                Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        delivery = Delivery(self.path, headers, body, time.time(), step.status, verified)
        with state.lock:
            state.deliveries.append(delivery)
        if state.echo:
            mark = {True: "verified", False: "BAD SIGNATURE", None: "unverified"}[verified]
            print(f"webhook {headers.get('webhook-id')} ({mark}): {body}", flush=True)
        try:
            self.send_response(step.status)
            if step.location:
                self.send_header("Location", step.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sender gave up waiting (a timeout test)

    def _read_body(self, expected: int) -> bytes:
        """Up to `expected` bytes of the body: fewer when the sender closed (or reset) the
        connection mid-body. read1 in a loop, not one read(): a reset mid-read would raise and
        lose what had arrived, and what arrived is what an aborted record reports."""
        chunks: list[bytes] = []
        received = 0
        try:
            while received < expected:
                chunk = self.rfile.read1(expected - received)
                if not chunk:
                    break  # end of stream: the sender closed before the end of the body
                chunks.append(chunk)
                received += len(chunk)
        except ConnectionResetError:
            pass  # the sender is gone (killed with unread data): a short body, as above
        return b"".join(chunks)

    def _aborted(self, expected: int, received: int) -> None:
        """Record a POST cut short, answer 400 if the sender can still hear it, and close: the
        stream is out of step, and a delivery it never finished sending is not one."""
        self.close_connection = True
        headers = {key.lower(): value for key, value in self.headers.items()}
        state = self.server.state
        with state.lock:
            state.aborted.append(Aborted(self.path, headers, expected, received, time.time()))
        if state.echo:
            webhook_id = headers.get("webhook-id")
            print(f"webhook {webhook_id} aborted: {received} of {expected} bytes", flush=True)
        try:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sender is gone, as expected

    def log_message(self, format: str, *args: Any) -> None:
        pass  # deliveries are recorded, not logged


def make_receiver(
    host: str = "127.0.0.1", port: int = 0, *, secret: str | None = None, echo: bool = False
) -> ReceiverServer:
    return ReceiverServer((host, port), ReceiverState(secret=secret, echo=echo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m standin.receiver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--secret",
        default=os.environ.get("RECEIVER_SECRET") or None,
        help="the customer's whsec_ secret, to verify signatures (default: $RECEIVER_SECRET)",
    )
    args = parser.parse_args(argv)
    server = make_receiver(args.host, args.port, secret=args.secret, echo=True)
    print(f"receiver listening on {server.url}", flush=True)
    try:
        server.serve_forever(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
