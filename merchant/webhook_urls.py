"""Rules for the webhook URLs a customer can give us (at onboarding and per request).

The full SSRF guard (resolve once, refuse private addresses at delivery time) belongs to the
delivery client; these checks refuse what can be known from the URL text alone.
"""

import ipaddress
from urllib.parse import urlsplit

from django.conf import settings


class WebhookURLError(ValueError):
    pass


_LOCAL_NAMES = {"localhost", "localhost.localdomain"}


def webhook_url_check(*, url: str, registered_url: str | None = None) -> str:
    """Return the URL if it may receive webhooks, else raise WebhookURLError saying why.

    With `registered_url`, the URL must also point at the same host as the one registered at
    onboarding: a request may choose a path, never a different receiver.
    """
    if len(url) > 2000:
        raise WebhookURLError("The URL is longer than 2000 characters.")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise WebhookURLError("The URL is malformed.") from exc
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE_HOSTS
    allowed_schemes = {"https", "http"} if allow_private else {"https"}
    if parts.scheme not in allowed_schemes:
        raise WebhookURLError("The URL must use https.")
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookURLError("The URL has no host.")
    if parts.username or parts.password:
        raise WebhookURLError("The URL must not carry credentials.")
    if parts.fragment:
        raise WebhookURLError("The URL must not have a fragment.")
    if not allow_private and _is_private_host(host):
        raise WebhookURLError("The URL must point at a public host.")
    if registered_url is not None:
        registered = urlsplit(registered_url)
        same_port = (port or _default_port(parts.scheme)) == (
            registered.port or _default_port(registered.scheme)
        )
        if host != (registered.hostname or "").lower() or not same_port:
            raise WebhookURLError("The URL must be on the host registered for webhooks.")
    return url


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _is_private_host(host: str) -> bool:
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: checked again against what it resolves to when we deliver
    return not address.is_global
