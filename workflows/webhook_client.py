"""Outbound webhook HTTP: Standard Webhooks signing and the SSRF guard.

The guard: the URL is checked again (scheme, host), the host is resolved exactly once, every
address is checked, and the connection goes to a checked address (the first; the next only if
one refuses outright), while the Host header, TLS SNI and certificate verification keep using the
name. No second lookup ever happens, so a resolver that answers a public address to the check
and 127.0.0.1 to the connection (DNS rebinding) gets nowhere.

urllib3 is used directly (requests' adapter would resolve the name again): a connection pool for
the address with `server_hostname` set to the name, which urllib3 sends as SNI and hands to the
ssl module's own hostname check (requests-toolbelt's HostHeaderSSLAdapter is the same idea with
`assert_hostname`). No redirects, no retries, no proxy from the environment (a proxy would
resolve the name itself), connect and read timeouts. Connections are kept alive per checked
address (one pool each, shared by the process's threads); an answer's body is read only when it
is short and declared (REUSE_BODY_BYTES), to keep its connection, and otherwise never.

Hand-written, not advocate (the SSRF-guarding wrapper of requests): archived by its author in
August 2023 and unmaintained; requests itself has no guard. The address policy is
merchant/netguard.py.
"""

import datetime as dt
import http.client
import socket
import time
from dataclasses import dataclass
from typing import Any

import urllib3
from django.conf import settings
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from standardwebhooks.webhooks import Webhook
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import LocationParseError, NewConnectionError
from urllib3.exceptions import TimeoutError as TransportTimeout
from urllib3.util import parse_url

from merchant.netguard import IPAddress, host_resolve
from merchant.webhook_urls import (
    WebhookURL,
    WebhookURLError,
    absolute_name,
    resolved_refusal,
    webhook_url_parse,
)
from workflows import concurrent

USER_AGENT = "merchant-service-webhooks/1"
# The same trust store requests used before the client pinned addresses; tests point it at
# their own CA.
CA_BUNDLE = DEFAULT_CA_BUNDLE_PATH
# The longest answer body read so that its connection can be kept (anything longer: closed).
REUSE_BODY_BYTES = 64 * 1024


class WebhookSendError(Exception):
    """A delivery attempt that got no HTTP answer; `permanent` means never retry."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class WebhookResponse:
    status_code: int
    latency_ms: int


@dataclass(frozen=True)
class Destination:
    """Where one attempt connects: the checked address, and the name it stands for."""

    url: WebhookURL
    addresses: tuple[IPAddress, ...]  # every one checked; tried in the resolver's order
    target: str  # path and query, percent-encoded


def webhook_signature_headers(
    *, secret: str, webhook_id: str, body: str, at: dt.datetime
) -> dict[str, str]:
    # standardwebhooks signs at.replace(tzinfo=UTC): it relabels, not converts. In UTC first, so
    # the signed time is the one in the header whatever zone `at` came in.
    at = at.astimezone(dt.UTC)
    signature = Webhook(secret).sign(msg_id=webhook_id, timestamp=at, data=body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


def webhook_destination(url: str) -> Destination:
    """Check the URL, resolve its host once and check every address; raise WebhookSendError.

    A refusal is permanent (the same URL will be refused next time); a failed lookup is not.
    """
    try:
        parsed = webhook_url_parse(url)
    except WebhookURLError as exc:
        raise WebhookSendError(f"refused: {exc}", permanent=True) from exc
    try:
        target = parse_url(url).request_uri
    except (ValueError, LocationParseError) as exc:
        raise WebhookSendError("refused: The URL is malformed.", permanent=True) from exc
    if parsed.address is not None:
        return Destination(url=parsed, addresses=(parsed.address,), target=target)
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE_HOSTS
    # With private hosts allowed (development), names like "localhost" live in /etc/hosts,
    # which an absolute name would miss.
    name = parsed.host if allow_private else absolute_name(parsed.host)
    try:
        addresses = host_resolve(name, parsed.port)
    except socket.gaierror as exc:
        raise WebhookSendError(f"cannot resolve host ({exc.strerror})") from exc
    except (OSError, UnicodeError) as exc:
        raise WebhookSendError(f"cannot resolve host ({type(exc).__name__})") from exc
    if not addresses:
        raise WebhookSendError("cannot resolve host (no address)")
    if not allow_private:
        reason = resolved_refusal(parsed, addresses)
        if reason:
            raise WebhookSendError(f"refused: {reason}", permanent=True)
    return Destination(url=parsed, addresses=tuple(addresses), target=target)


def _connections() -> urllib3.PoolManager:
    # One pool per (scheme, checked address, port, name, trust store), the least recently used
    # closed beyond num_pools; maxsize: the keep-alive connections kept per pool, one per thread
    # that may send at once (block=False: a burst beyond it opens more, closed after use).
    return urllib3.PoolManager(num_pools=64, maxsize=concurrent.io_threads(), retries=False)


# The process's keep-alive connections to receivers, shared by its threads. A connection is
# only ever to an address that was checked, for the name it was checked for: every attempt
# still resolves and checks, and takes the pool of the address it chose.
_connections_kept = concurrent.PerProcess(_connections)


def webhook_pool(destination: Destination, address: IPAddress) -> urllib3.HTTPConnectionPool:
    """The keep-alive pool for a checked address, verifying TLS for the URL's name."""
    kwargs: dict[str, Any] = {}
    if destination.url.scheme == "https":
        # server_hostname: SNI and the stdlib's certificate hostname check use the name,
        # while the socket connects to the address that was checked.
        kwargs = {
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": CA_BUNDLE,
            "server_hostname": destination.url.host,
        }
    return _connections_kept.get().connection_from_host(
        str(address), destination.url.port, destination.url.scheme, pool_kwargs=kwargs
    )


def webhook_connections_close() -> None:
    """Close every kept connection of this process (tests: none outlives its test)."""
    _connections_kept.get().clear()
    _connections_kept.forget()


def webhook_post(*, url: str, body: str, headers: dict[str, str]) -> WebhookResponse:
    """POST one signed webhook; raises WebhookSendError when no HTTP answer came back."""
    destination = webhook_destination(url)
    started = time.monotonic()
    for index, address in enumerate(destination.addresses):
        try:
            status_code = _post_once(destination, address, body=body, headers=headers)
            break
        except NewConnectionError as exc:
            # Refused or unreachable at once (say an IPv6 address without an IPv6 route): the
            # next checked address, as a resolving client would. A timeout ends the attempt,
            # so that one attempt stays within its lease.
            if index + 1 == len(destination.addresses):
                raise WebhookSendError(f"connection failed ({type(exc).__name__})") from exc
        except TransportTimeout as exc:
            raise WebhookSendError("timed out") from exc
        except (TransportError, http.client.HTTPException, OSError) as exc:
            raise WebhookSendError(f"connection failed ({type(exc).__name__})") from exc
    latency_ms = int((time.monotonic() - started) * 1000)
    return WebhookResponse(status_code=status_code, latency_ms=latency_ms)


def _post_once(
    destination: Destination, address: IPAddress, *, body: str, headers: dict[str, str]
) -> int:
    timeout = settings.WEBHOOK_TIMEOUT_SECONDS
    deadline = time.monotonic() + timeout
    # preload_content=False: the status line is the answer; the body is read only as far as
    # _reusable allows, so a receiver cannot make us read an unbounded one (http.client caps
    # the headers at 100 lines of 64 KiB).
    response = webhook_pool(destination, address).urlopen(
        "POST",
        destination.target,
        body=body.encode("utf-8"),
        headers={
            **headers,
            "Host": destination.url.host_header,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        },
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        redirect=False,  # a redirect is an answer, never followed (SSRF)
        retries=False,  # the delivery schedule retries, with a fresh check
        preload_content=False,
        release_conn=False,
    )
    try:
        if not _reusable(response, deadline):
            response.close()  # and its connection: the pool opens a new one next time
    finally:
        response.release_conn()
    return response.status


def _reusable(response: urllib3.BaseHTTPResponse, deadline: float) -> bool:
    """Read the rest of a small answer, so that its connection can carry the next POST.

    Only a body of a declared length up to REUSE_BODY_BYTES, and only while the attempt's time
    lasts (each read1 waits for one receipt at most, within the read timeout): a chunked, long,
    or trickled answer closes the connection instead.
    """
    remaining = response.length_remaining
    if remaining is None or remaining > REUSE_BODY_BYTES:
        return False
    try:
        while remaining > 0 and time.monotonic() < deadline:
            chunk = response.read1(remaining, decode_content=False)
            if not chunk:
                return False
            remaining -= len(chunk)
    except (TransportError, http.client.HTTPException, OSError):
        return False
    return remaining == 0
