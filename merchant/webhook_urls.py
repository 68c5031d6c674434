"""Rules for the webhook URLs a customer can give us (at onboarding and per request).

Two kinds of failure: a URL that is not usable as a URL (WebhookURLError: a 400 at the API) and
a well-formed URL naming a destination we will not call (WebhookURLRefused: a 422). The
delivery client applies the same rules again, then resolves the host once and checks every
address (merchant.netguard) before connecting to the one it checked.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from merchant.netguard import IPAddress, address_refusal, host_resolve, literal_address

MAX_URL_LENGTH = 2000


class WebhookURLError(ValueError):
    """The URL cannot be used as a webhook URL at all (malformed)."""


class WebhookURLRefused(WebhookURLError):
    """A well-formed URL whose destination is not allowed (scheme, host, address)."""


# Names that only ever mean something inside a network: special-use (RFC 6761, RFC 8375) and
# the private TLDs of RFC 6762 appendix G.
_LOCAL_NAMES = {"localhost"}
_LOCAL_SUFFIXES = (
    ".localhost",
    ".local",
    ".localdomain",
    ".internal",
    ".intranet",
    ".lan",
    ".home",
    ".corp",
    ".private",
    ".home.arpa",
    ".arpa",
)
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(frozen=True)
class WebhookURL:
    scheme: str
    host: str  # ASCII (IDNA A-labels), lower case, no trailing dot, no IPv6 brackets
    port: int
    address: IPAddress | None  # when the host is an address literal

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def webhook_url_parse(url: str) -> WebhookURL:
    """Parse and apply every rule that needs no DNS; raises WebhookURLError or WebhookURLRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    # urlsplit silently drops tabs and newlines; a URL carrying them is refused, not repaired.
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookURLError("The URL must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise WebhookURLError("The URL is malformed.") from exc
    if not parts.scheme or not parts.netloc:
        raise WebhookURLError("The URL must be absolute (https://host/path).")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("The URL must not carry credentials.")
    if parts.fragment:
        raise WebhookURLError("The URL must not have a fragment.")
    if port == 0:
        raise WebhookURLError("The URL's port must be 1 to 65535.")
    host = _normalized_host(parts.hostname or "")
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE_HOSTS
    if parts.scheme not in ("https", "http"):
        raise WebhookURLRefused(f"The URL must use https (unsupported scheme {parts.scheme!r}).")
    if parts.scheme != "https" and not allow_private:
        raise WebhookURLRefused("The URL must use https.")
    parsed = WebhookURL(
        scheme=parts.scheme,
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
        address=literal_address(host),
    )
    if not allow_private:
        reason = _host_refusal(parsed)
        if reason:
            raise WebhookURLRefused(f"The URL must point at a public host: {reason}.")
    return parsed


def webhook_url_check(*, url: str, registered_url: str | None = None, resolve: bool = False) -> str:
    """Return the URL if it may receive webhooks, else raise WebhookURLError saying why.

    With `registered_url`, the URL must also point at the same host as the one registered at
    onboarding: a request may choose a path, never a different receiver.

    `resolve` also looks the host up now and refuses a name with any non-public address. Only
    registration (an operator's command or form, where a slow lookup hurts nobody) asks for it;
    POST /link never does: the lookup would put DNS latency and DNS failures on the
    acknowledgement path, and buys nothing there: the per-request URL must be on the registered
    host, and the answer may change before delivery, which checks again anyway. A lookup that
    fails is not a refusal either: DNS may be set up after onboarding; delivery will decide.
    """
    parsed = webhook_url_parse(url)
    if registered_url is not None:
        try:
            registered: WebhookURL | None = webhook_url_parse(registered_url)
        except WebhookURLError:
            registered = None  # a registration made under older rules: nothing may match it
        if registered is None or (parsed.scheme, parsed.host, parsed.port) != (
            registered.scheme,
            registered.host,
            registered.port,
        ):
            raise WebhookURLRefused("The URL must be on the host registered for webhooks.")
    if resolve and parsed.address is None and not settings.WEBHOOK_ALLOW_PRIVATE_HOSTS:
        try:
            addresses = host_resolve(absolute_name(parsed.host), parsed.port)
        except (OSError, UnicodeError):
            return url
        reason = resolved_refusal(parsed, addresses)
        if reason:
            raise WebhookURLRefused(f"The URL must point at a public host: {reason}.")
    return url


def resolved_refusal(parsed: WebhookURL, addresses: Sequence[IPAddress]) -> str | None:
    """Why the host's resolved addresses are refused: one bad address is enough, since the
    connection could go to any of them (or the resolver could be rotating through them)."""
    for address in addresses:
        label = address_refusal(address)
        if label:
            return f"{parsed.host} resolves to {address}, a non-public address ({label})"
    return None


def absolute_name(host: str) -> str:
    """The name with a trailing dot, so that the resolver never tries it under the local
    search domains ("hooks.acme" must not become "hooks.acme.svc.cluster.local")."""
    return f"{host}."


def _normalized_host(hostname: str) -> str:
    host = hostname.lower().rstrip(".")
    if not host:
        raise WebhookURLError("The URL has no host.")
    if literal_address(host) is not None:
        return host.strip("[]")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise WebhookURLError("The URL's host is not a valid name.") from exc
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise WebhookURLError("The URL's host is not a valid name.")
    return host


def _host_refusal(parsed: WebhookURL) -> str | None:
    if parsed.address is not None:
        label = address_refusal(parsed.address)
        return f"{parsed.host} is a non-public address ({label})" if label else None
    host = parsed.host
    if host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES):
        return f"{host} is a non-public name"
    if "." not in host:
        # A single label is completed by the local search domains: an internal name.
        return f"{host} is a non-public name (not fully qualified)"
    return None
