"""The stand-in webhook receiver (standin/receiver.py) against a raw socket client: a POST whose
body stops short of its Content-Length (a worker SIGKILLed mid-send, `make chaos` scenario 17)
is recorded as aborted, never as a delivery with a bad signature; a complete one still is a
delivery, and verifies.

The last test sends through the service's own client (workflows/webhook_client.py): what it
sends in one piece always verifies, retries included. It reads Django settings, no database.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from standin.receiver import ReceiverServer, make_receiver
from tests.processes import serving
from workflows.services.webhooks import webhook_payload
from workflows.webhook_client import webhook_post, webhook_signature_headers

SECRET = "whsec_" + base64.b64encode(b"receiver-test-signing-key-0123456").decode()
BODY = '{"type":"link.completed","data":{"workflow-id":"w-1","status":"COMPLETED"}}'


@pytest.fixture
def receiver() -> Iterator[ReceiverServer]:
    server = make_receiver(secret=SECRET)
    with serving(server):
        yield server


def signed_request(
    body: str,
    webhook_id: str,
    *,
    declared: int | None = None,
    path: str = "/hooks",
    secret: str = SECRET,
) -> bytes:
    """A whole signed POST `path`, headers then body; `declared` overrides Content-Length."""
    encoded = body.encode()
    at = dt.datetime.now(dt.UTC)
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: receiver",
        "Content-Type: application/json",
        f"Content-Length: {len(encoded) if declared is None else declared}",
        f"webhook-id: {webhook_id}",
        f"webhook-timestamp: {int(at.timestamp())}",
        f"webhook-signature: {Webhook(secret).sign(webhook_id, at, body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + encoded


def cut_short(body: str, webhook_id: str, keep: int) -> bytes:
    """The request of a sender killed after `keep` bytes of the body: Content-Length promises
    the whole body."""
    whole = signed_request(body, webhook_id)
    return whole[: len(whole) - len(body.encode()) + keep]


def connect(receiver: ReceiverServer) -> socket.socket:
    host, port = receiver.server_address[:2]
    return socket.create_connection((str(host), port), timeout=5)


def read_answer(sock: socket.socket) -> bytes:
    """One answer's status line and headers (the receiver's answers have no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a whole answer: {data!r}"
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stats(receiver: ReceiverServer) -> Any:
    url = f"{receiver.url}/_control/stats"
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - a local http URL
        return json.loads(answer.read())


def test_a_body_cut_short_is_aborted_not_a_delivery(receiver):
    with connect(receiver) as sock:
        sock.sendall(cut_short(BODY, "msg_cut", keep=20))
    eventually(lambda: bool(receiver.aborted()))
    # The aborted record comes first: by then a delivery, had one been recorded, is listed.
    assert receiver.deliveries() == []
    [aborted] = receiver.aborted()
    assert (aborted.path, aborted.expected, aborted.received) == ("/hooks", len(BODY), 20)
    assert aborted.headers["webhook-id"] == "msg_cut"


def test_a_body_cut_short_is_answered_400_and_its_connection_closed(receiver):
    with connect(receiver) as sock:
        sock.sendall(cut_short(BODY, "msg_cut", keep=1))
        sock.shutdown(socket.SHUT_WR)  # the body ends here; the answer can still come back
        answer = read_to_end(sock)  # returns only once the receiver has closed
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert receiver.deliveries() == []
    assert len(receiver.aborted()) == 1


def test_a_kept_alive_connection_delivers_then_is_cut_short(receiver):
    """The killed worker's connection: a delivery completed on it is still one, and verifies;
    the next one, cut short, is not."""
    with connect(receiver) as sock:
        sock.sendall(signed_request(BODY, "msg_whole"))
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(cut_short(BODY, "msg_cut", keep=len(BODY) - 1))
    eventually(lambda: bool(receiver.aborted()))
    [delivery] = receiver.deliveries()
    assert delivery.headers["webhook-id"] == "msg_whole"
    assert delivery.body == BODY
    assert (delivery.verified, delivery.answered) == (True, 200)
    [aborted] = receiver.aborted()
    assert (aborted.headers["webhook-id"], aborted.received) == ("msg_cut", len(BODY) - 1)


def test_each_customers_path_verifies_with_its_own_secret(receiver):
    """One receiver for two customers (a chaos scenario's): each signs with its own secret."""
    other = "whsec_" + base64.b64encode(b"another-customer-signing-key-0123").decode()
    receiver.add_secret("/hooks/b", other)
    sent = [
        ("/hooks", SECRET, "msg_a"),
        ("/hooks/b", other, "msg_b"),
        ("/hooks/b", SECRET, "msg_b_wrong"),  # the other customer's secret is no good here
        ("/hooks", other, "msg_a_wrong"),
    ]
    with connect(receiver) as sock:
        for path, secret, webhook_id in sent:
            sock.sendall(signed_request(BODY, webhook_id, path=path, secret=secret))
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
    assert [(d.path, d.headers["webhook-id"], d.verified) for d in receiver.deliveries()] == [
        ("/hooks", "msg_a", True),
        ("/hooks/b", "msg_b", True),
        ("/hooks/b", "msg_b_wrong", False),
        ("/hooks", "msg_a_wrong", False),
    ]


def test_stats_count_aborted_apart_and_reset_clears_them(receiver):
    with connect(receiver) as sock:
        sock.sendall(signed_request(BODY, "msg_whole"))
        read_answer(sock)
        sock.sendall(cut_short(BODY, "msg_cut", keep=0))
    eventually(lambda: bool(receiver.aborted()))
    assert stats(receiver) == {"deliveries": 1, "aborted": 1}
    receiver.reset()
    assert (receiver.deliveries(), receiver.aborted()) == ([], [])
    assert stats(receiver) == {"deliveries": 0, "aborted": 0}


def test_echo_prints_one_line_for_an_aborted_delivery_without_its_body(capsys):
    server = make_receiver(secret=SECRET, echo=True)
    with serving(server), connect(server) as sock:
        sock.sendall(cut_short(BODY, "msg_echo", keep=30))
        sock.close()
        eventually(lambda: bool(server.aborted()))
    out = capsys.readouterr().out
    assert out == f"webhook msg_echo aborted: 30 of {len(BODY)} bytes\n"
    assert "link.completed" not in out


def test_the_services_complete_deliveries_verify_retries_included(receiver, settings):
    """What workflows/webhook_client.py sends in one piece verifies: the signature covers the
    UTF-8 bytes sent, Content-Length is their exact count, and a retry (the same payload, a new
    timestamp, signed again) verifies as well. Non-ASCII text too, though the service's
    payloads (json.dumps, ensure_ascii) are ASCII."""
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True
    settings.WEBHOOK_TIMEOUT_SECONDS = 5.0
    payload = webhook_payload(
        event_type="link.failed",
        at=timezone.now(),
        data={"workflow-id": "w-2", "reason": "naïve café ☃ \u2028 \U0001f600"},
    )
    bodies = [payload, '{"reason":"naïve café ☃ \u2028 \U0001f600"}']
    for number, body in enumerate(bodies):
        for _attempt in range(2):
            headers = webhook_signature_headers(
                secret=SECRET, webhook_id=f"msg_{number}", body=body, at=timezone.now()
            )
            answer = webhook_post(url=f"{receiver.url}/hooks", body=body, headers=headers)
            assert answer.status_code == 200
    sent = receiver.deliveries()
    assert [(d.headers["webhook-id"], d.body) for d in sent] == [
        ("msg_0", bodies[0]),
        ("msg_0", bodies[0]),
        ("msg_1", bodies[1]),
        ("msg_1", bodies[1]),
    ]
    assert all(d.verified is True for d in sent)
    assert [d.headers["content-length"] for d in sent] == [
        str(len(body.encode())) for body in bodies for _attempt in range(2)
    ]
    assert receiver.aborted() == []
