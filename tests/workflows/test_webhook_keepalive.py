"""Webhook connections kept alive (workflows/webhook_client.py): one connection carries the next
POST to the same checked address, and only when its answer was read to the end quickly; a long,
undeclared or trickled body closes it instead.

The receivers here are raw local sockets, so that each test sees every connection opened and
says exactly what the answer looks like on the wire.
"""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from standin.receiver import make_receiver
from tests.processes import serving
from workflows.webhook_client import WebhookSendError, webhook_post


@dataclass
class RawReceiver:
    """Answers every request on every connection with `answer` (bytes on the wire, or a
    function of the connection that writes them itself); counts the connections."""

    answer: Any
    connections: int = 0
    requests: int = 0
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            buffered = b""
            while True:
                try:
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    head, _, rest = buffered.partition(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    buffered = rest[length:]
                    with self.lock:
                        self.requests += 1
                    if callable(self.answer):
                        self.answer(conn)
                    else:
                        conn.sendall(self.answer)
                except OSError:
                    return


@contextmanager
def raw_receiver(answer: Any) -> Iterator[RawReceiver]:
    receiver = RawReceiver(answer)
    listener = socket.create_server(("127.0.0.1", 0))
    receiver.port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with receiver.lock:
                receiver.connections += 1
            threading.Thread(target=receiver.serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        stop.set()
        listener.close()


@pytest.fixture(autouse=True)
def _local(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True  # local receivers; the same client path
    settings.WEBHOOK_TIMEOUT_SECONDS = 1


def post(url: str) -> int:
    return webhook_post(url=url, body='{"n": 1}', headers={"webhook-id": "msg_1"}).status_code


def test_one_connection_carries_the_next_deliveries() -> None:
    with raw_receiver(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as receiver:
        assert [post(receiver.url) for _ in range(3)] == [200, 200, 200]
    assert (receiver.requests, receiver.connections) == (3, 1)


def test_a_short_declared_body_is_read_and_the_connection_kept() -> None:
    body = b'{"received": true}'
    answer = b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with raw_receiver(answer) as receiver:
        assert [post(receiver.url) for _ in range(3)] == [202, 202, 202]
    assert (receiver.requests, receiver.connections) == (3, 1)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["longer-than-64-KiB", "chunked", "connection-close", "http-1.0"],
)
def test_other_answers_close_the_connection(answer: bytes) -> None:
    with raw_receiver(answer) as receiver:
        assert [post(receiver.url) for _ in range(2)] == [200, 200]
    assert (receiver.requests, receiver.connections) == (2, 2)


def test_a_trickled_body_ends_with_the_attempts_time_and_closes_the_connection() -> None:
    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            conn.sendall(b"x")
            time.sleep(0.3)  # each byte within the read timeout (1 s), all of them far beyond

    with raw_receiver(trickle) as receiver:
        started = time.monotonic()
        assert post(receiver.url) == 200
        # The attempt's time (1 s) plus at most one read's wait.
        assert time.monotonic() - started < 2.5
        assert post(receiver.url) == 200
    assert receiver.connections == 2


def test_a_kept_connection_the_receiver_closed_is_not_used() -> None:
    """The receiver closes idle connections (as web servers do after a few seconds): the next
    POST sees it closed before sending and opens another."""

    def answer_and_close(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.shutdown(socket.SHUT_RDWR)  # after the answer, as an idle timeout would

    with raw_receiver(answer_and_close) as receiver:
        assert post(receiver.url) == 200
        time.sleep(0.1)
        assert post(receiver.url) == 200
    assert (receiver.requests, receiver.connections) == (2, 2)


def test_a_delivery_that_timed_out_leaves_no_connection_behind() -> None:
    """The answer that came too late must not be read as the next delivery's answer."""
    answers = iter([0.0, 2.0, 0.0])

    def late_then_fast(conn: socket.socket) -> None:
        time.sleep(next(answers))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    with raw_receiver(late_then_fast) as receiver:
        assert post(receiver.url) == 200
        with pytest.raises(WebhookSendError, match="timed out"):
            post(receiver.url)
        assert post(receiver.url) == 200
    assert receiver.connections == 2


def test_the_harness_receiver_keeps_connections_alive() -> None:
    """standin.receiver answers HTTP/1.1, so the bench and the demo see kept connections too."""
    server = make_receiver()
    accepted = []
    get_request = server.get_request

    def counted() -> Any:
        accepted.append(1)
        return get_request()

    server.get_request = counted  # type: ignore[method-assign]
    with serving(server):
        assert [post(f"{server.url}/hooks") for _ in range(5)] == [200] * 5
        assert len(server.deliveries()) == 5
    assert len(accepted) == 1


def test_a_sender_killed_mid_connection_leaves_no_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A worker SIGKILLed with a kept connection open resets it; the receiver (and the FHIR
    stand-in, the same QuietDisconnects) ends that connection without printing a traceback."""
    server = make_receiver()
    with serving(server):
        assert post(f"{server.url}/hooks") == 200
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
        sock.sendall(b"POST /hooks HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        sock.recv(65536)
        # SO_LINGER 0: close() sends RST, as the kernel does for a killed process's socket
        # with unread data; the handler's next read gets ECONNRESET.
        sock.sendall(b"POST /hooks HTTP/1.1\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        time.sleep(0.3)
    assert "Traceback" not in capfd.readouterr().err
