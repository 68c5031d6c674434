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
resolve the name itself), connect and read timeouts, and the body of the answer is never read.
"""

import datetime as dt
import http.client
import socket
import time
from dataclasses import dataclass

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

USER_AGENT = "merchant-service-webhooks/1"
# The same trust store requests used before the client pinned addresses; tests point it at
# their own CA.
CA_BUNDLE = DEFAULT_CA_BUNDLE_PATH


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


def webhook_pool(destination: Destination, address: IPAddress) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to a checked address, verifying TLS for the URL's name."""
    timeout = urllib3.Timeout(
        connect=settings.WEBHOOK_TIMEOUT_SECONDS, read=settings.WEBHOOK_TIMEOUT_SECONDS
    )
    host = str(address)
    if destination.url.scheme == "https":
        # server_hostname: SNI and the stdlib's certificate hostname check use the name,
        # while the socket connects to `host`, the address that was checked.
        return urllib3.HTTPSConnectionPool(
            host,
            destination.url.port,
            timeout=timeout,
            retries=False,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            ca_certs=CA_BUNDLE,
            server_hostname=destination.url.host,
        )
    return urllib3.HTTPConnectionPool(
        host, destination.url.port, timeout=timeout, retries=False, maxsize=1
    )


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
    pool = webhook_pool(destination, address)
    try:
        # preload_content=False and no body read: the status line is the answer, and a
        # receiver cannot make us read an unbounded body (http.client caps the headers at 100
        # lines of 64 KiB).
        response = pool.urlopen(
            "POST",
            destination.target,
            body=body.encode("utf-8"),
            headers={
                **headers,
                "Host": destination.url.host_header,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            },
            redirect=False,  # a redirect is an answer, never followed (SSRF)
            retries=False,  # the delivery schedule retries, with a fresh check
            preload_content=False,
        )
        status_code = response.status
        response.close()
        return status_code
    finally:
        pool.close()
