"""Outgoing result callbacks, signed with the Standard Webhooks scheme (standardwebhooks.com)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

WHSEC_PREFIX = "whsec_"
SEARCH_ID_PLACEHOLDER = "{search_id}"


def decode_secret(secret: str) -> bytes:
    """The HMAC key is the base64 payload after ``whsec_``; reject anything else at start-up."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError("callback secret must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret.removeprefix(WHSEC_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("callback secret is not valid base64 after whsec_") from None
    if not key:
        raise ValueError("callback secret is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookSender:
    """Delivers each completed job's Bundle in its own background thread, with bounded retries."""

    def __init__(
        self,
        url_template: str,
        secret: str,
        attempts: int = 4,
        backoff_s: float = 0.25,
        timeout_s: float = 5.0,
    ) -> None:
        if SEARCH_ID_PLACEHOLDER not in url_template:
            raise ValueError("callback URL must contain {search_id}")
        # Only http(s) may be opened: urllib would otherwise happily read file:// URLs.
        if urlsplit(url_template).scheme not in ("http", "https"):
            raise ValueError("callback URL must be http or https")
        self._url_template = url_template
        self._key = decode_secret(secret)
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s

    def send(self, search_id: str, body: bytes, on_attempt: Callable[[bool], None]) -> None:
        url = self._url_template.replace(SEARCH_ID_PLACEHOLDER, search_id)
        thread = threading.Thread(
            target=self._deliver, args=(url, body, on_attempt), name=f"webhook-{search_id}"
        )
        thread.daemon = True
        thread.start()

    def _deliver(self, url: str, body: bytes, on_attempt: Callable[[bool], None]) -> None:
        # The id stays the same across retries so the receiver can deduplicate; the timestamp and
        # therefore the signature are fresh per attempt, as the scheme expects.
        msg_id = f"msg_{uuid.uuid4().hex}"
        for attempt in range(1, self._attempts + 1):
            timestamp = int(time.time())
            # The URL scheme was restricted to http(s) in __init__.
            request = urllib.request.Request(  # noqa: S310
                url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/fhir+json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": sign(self._key, msg_id, timestamp, body),
                },
            )
            error = self._post(request)
            on_attempt(error is None)
            if error is None:
                return
            print(
                f"standin: callback {msg_id} attempt {attempt}/{self._attempts} failed: {error}",
                file=sys.stderr,
                flush=True,
            )
            if attempt < self._attempts:
                time.sleep(self._backoff_s * 2 ** (attempt - 1))

    def _post(self, request: urllib.request.Request) -> str | None:
        """One delivery attempt: None on a 2xx answer, else a short reason (never the body)."""
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:  # URLError, refused connections and timeouts are all OSErrors
            return type(exc).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"
