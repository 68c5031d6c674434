"""Outbound webhook HTTP: Standard Webhooks signing, no redirects, timeouts, address checks."""

import datetime as dt
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from django.conf import settings
from standardwebhooks.webhooks import Webhook

USER_AGENT = "merchant-service-webhooks/1"


class WebhookSendError(Exception):
    """A delivery attempt that got no HTTP answer; `permanent` means never retry."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class WebhookResponse:
    status_code: int
    latency_ms: int


def webhook_signature_headers(
    *, secret: str, webhook_id: str, body: str, at: dt.datetime
) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id=webhook_id, timestamp=at, data=body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


def _check_destination(url: str) -> None:
    """Refuse URLs that resolve to non-public addresses unless private hosts are allowed.

    The full guard (connecting to the very address checked) is the security issue's work; this
    refuses what the resolver says now.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise WebhookSendError("unsupported URL", permanent=True)
    if settings.WEBHOOK_ALLOW_PRIVATE_HOSTS:
        return
    if parts.scheme != "https":
        raise WebhookSendError("webhook URLs must use https", permanent=True)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise WebhookSendError(f"cannot resolve host ({exc.strerror})") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise WebhookSendError("host resolves to a non-public address", permanent=True)


def webhook_post(*, url: str, body: str, headers: dict[str, str]) -> WebhookResponse:
    """POST one signed webhook; raises WebhookSendError when no HTTP answer came back."""
    _check_destination(url)
    started = time.monotonic()
    try:
        # stream=True and no body read: the status line is the answer, and a receiver that
        # stalls after it cannot hold the worker or make us read an unbounded body.
        with requests.post(
            url,
            data=body.encode("utf-8"),
            headers={
                **headers,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=settings.WEBHOOK_TIMEOUT_SECONDS,
            allow_redirects=False,  # a redirect is an answer, never followed (SSRF)
            stream=True,
        ) as response:
            status_code = response.status_code
    except requests.Timeout as exc:
        raise WebhookSendError("timed out") from exc
    except requests.RequestException as exc:
        raise WebhookSendError(f"connection failed ({type(exc).__name__})") from exc
    latency_ms = int((time.monotonic() - started) * 1000)
    return WebhookResponse(status_code=status_code, latency_ms=latency_ms)
