"""Customer use cases: onboarding, tokens and their revocation, webhook secret rotation."""

import base64
import datetime as dt
import functools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from merchant.models import MAX_WEIGHT, Customer, ReviewBy
from merchant.webhook_urls import webhook_url_check

TOKEN_ALGORITHM = "HS256"  # noqa: S105 -- pinned here; never taken from the token's header
TOKEN_MAX_LENGTH = 4096
# The JOSE header token_issue writes, and so the only one accepted. PyJWT skips header parameters
# it does not know and honours some we never use (`crit: ["b64"]`, RFC 7797): a `kid`, `jku`,
# `jwk`, `crit` or another `typ` means the token was not made by token_issue, whoever signed it.
TOKEN_HEADER = {"alg": TOKEN_ALGORITHM, "typ": "JWT"}


class _HMACKeyCheckedOnce(jwt.algorithms.HMACAlgorithm):
    """HMAC whose key is checked once per key instead of at every token: PyJWT refuses keys that
    look like PEM, SSH, DER or a JWK (~9 us, 28% of verifying a token here, the largest part of
    GET /link/status's own CPU in `make bench`'s profile), and the key is a setting. A refused
    key raises every time (lru_cache keeps only results)."""

    @functools.lru_cache(maxsize=8)  # noqa: B019 -- one instance, alive as long as the process
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)


# Registered for the process (PyJWT's module-level encode and decode share one registry).
jwt.unregister_algorithm(TOKEN_ALGORITHM)
jwt.register_algorithm(TOKEN_ALGORITHM, _HMACKeyCheckedOnce(jwt.algorithms.HMACAlgorithm.SHA256))

# How long the old webhook secret keeps signing after a rotation unless the operator says.
WEBHOOK_SECRET_OVERLAP_DEFAULT = dt.timedelta(hours=24)
# An old secret signing for longer than this is no longer a rotation.
WEBHOOK_SECRET_OVERLAP_MAX = dt.timedelta(days=30)

_ROTATED_FIELDS = [
    "webhook_secret",
    "webhook_secret_previous",
    "webhook_secret_previous_until",
    "updated_at",
]

logger = logging.getLogger(__name__)


class InvalidToken(Exception):
    """Any reason a customer token is not accepted; the reason is for logs, never for clients."""


@dataclass(frozen=True)
class CustomerCredentials:
    customer: Customer
    token: str

    def as_dict(self) -> dict[str, str]:
        return {
            "customer_id": str(self.customer.id),
            "token": self.token,
            "webhook_secret": self.customer.webhook_secret,
        }


def webhook_secret_generate() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def customer_webhook_secret_rotate(*, customer: Customer, overlap: dt.timedelta, actor: str) -> str:
    """Give the customer a new webhook secret and return it (to be shown once).

    The current secret becomes the previous one and keeps signing, as a second signature, until
    now + overlap: receivers verifying with either secret accept every webhook meanwhile. An
    overlap of 0 drops the old secret at once (a leaked secret). Only one previous secret is
    kept: rotating again within the window ends the older one's window too. `customer` is
    updated in place.
    """
    if not dt.timedelta(0) <= overlap <= WEBHOOK_SECRET_OVERLAP_MAX:
        raise ValueError(f"The overlap must be between 0 and {WEBHOOK_SECRET_OVERLAP_MAX}.")
    secret = webhook_secret_generate()
    with transaction.atomic():
        # Locked: of two rotations at once, the second keeps the first's secret as previous.
        locked = Customer.objects.select_for_update().get(id=customer.id)
        if overlap:
            locked.webhook_secret_previous = locked.webhook_secret
            locked.webhook_secret_previous_until = timezone.now() + overlap
        else:
            locked.webhook_secret_previous = ""
            locked.webhook_secret_previous_until = None
        locked.webhook_secret = secret
        # A save, not a queryset update: post_save drops this process's cached customer.
        locked.save(update_fields=_ROTATED_FIELDS)
    for field in _ROTATED_FIELDS:
        setattr(customer, field, getattr(locked, field))
    logger.info(
        "webhook secret of customer %s rotated by %s; the old one signs until %s",
        customer.id,
        actor,
        (customer.webhook_secret_previous_until or customer.updated_at).isoformat(),
    )
    return secret


def customer_onboard(
    *, name: str, webhook_url: str, review_by: str = ReviewBy.OPERATOR, weight: int = 1
) -> CustomerCredentials:
    name = name.strip()
    if not name:
        raise ValueError("The customer name must not be empty.")
    if review_by not in ReviewBy.values:
        raise ValueError(f"review_by must be one of {', '.join(ReviewBy.values)}.")
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be a whole number from 1 to {MAX_WEIGHT}.")
    webhook_url_check(url=webhook_url, resolve=True)
    customer = Customer.objects.create(
        name=name,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret_generate(),
        review_by=review_by,
        weight=weight,
    )
    return CustomerCredentials(customer=customer, token=token_issue(customer=customer))


def token_issue(*, customer: Customer, ttl_seconds: int | None = None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.TOKEN_ISSUER,
        "aud": settings.TOKEN_AUDIENCE,
        "sub": str(customer.id),
        "iat": now,
        "exp": now + (ttl_seconds if ttl_seconds is not None else settings.TOKEN_TTL_SECONDS),
        "jti": uuid.uuid4().hex,
        "ver": customer.token_version,
    }
    # The header spelled out, not PyJWT's default: token_verify accepts exactly this one.
    return jwt.encode(
        claims, settings.TOKEN_SIGNING_KEY, algorithm=TOKEN_ALGORITHM, headers=dict(TOKEN_HEADER)
    )


def customer_issue_token(*, customer_id: uuid.UUID) -> CustomerCredentials:
    customer = Customer.objects.get(id=customer_id)
    return CustomerCredentials(customer=customer, token=token_issue(customer=customer))


def customer_revoke_tokens(*, customer_id: uuid.UUID) -> Customer:
    """Make every token issued so far stop working (the next `token_issue` works again)."""
    with transaction.atomic():
        updated = Customer.objects.filter(id=customer_id).update(
            token_version=F("token_version") + 1
        )
        if not updated:
            raise Customer.DoesNotExist(f"No customer {customer_id}")
        # A queryset update sends no signal (merchant/signals.py).
        transaction.on_commit(lambda: customer_cache_forget(customer_id=customer_id))
    customer_cache_forget(customer_id=customer_id)
    return Customer.objects.get(id=customer_id)


def token_verify(*, token: str) -> Customer:
    """Return the active customer a token was issued to, or raise InvalidToken."""
    if not token or len(token) > TOKEN_MAX_LENGTH:
        raise InvalidToken("missing or oversized token")
    try:
        # PyJWT (2.15, as locked) also refuses an `nbf` or `iat` in the future and an unknown
        # `crit` (CVE-2026-32597, fixed in 2.12); tests/merchant/test_token_matrix.py holds it
        # to that, so an upgrade or downgrade that loses a check fails the suite.
        decoded = jwt.decode_complete(
            token,
            settings.TOKEN_SIGNING_KEY,
            algorithms=[TOKEN_ALGORITHM],
            audience=settings.TOKEN_AUDIENCE,
            issuer=settings.TOKEN_ISSUER,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "ver"], "strict_aud": True},
        )
        claims = decoded["payload"]
        customer_id = uuid.UUID(str(claims["sub"]))
        version = claims["ver"]
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise InvalidToken(type(exc).__name__) from exc
    if decoded["header"] != TOKEN_HEADER:
        raise InvalidToken("header is not the one token_issue writes")
    if claims["sub"] != str(customer_id):
        # uuid.UUID also reads "urn:uuid:...", braces and upper case: one subject, one spelling.
        raise InvalidToken("subject is not a canonical UUID")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidToken("version claim is not an integer")
    customer = _customer_cached(customer_id)
    if customer is None:
        raise InvalidToken("unknown customer")
    if not customer.is_active:
        raise InvalidToken("inactive customer")
    if version != customer.token_version:
        raise InvalidToken("revoked token")
    return customer


# Customers as token_verify last read them, per process: (read at, customer or None if unknown).
# Every authenticated request needs its customer's state; reading it from PostgreSQL each time
# was the ack path's second round trip. Changes made in this process drop the entry at once
# (merchant/signals.py); other processes see them within CUSTOMER_CACHE_SECONDS.
_customers: dict[uuid.UUID, tuple[float, Customer | None]] = {}
_CUSTOMERS_MAX = 10_000


def _customer_cached(customer_id: uuid.UUID) -> Customer | None:
    ttl = settings.CUSTOMER_CACHE_SECONDS
    now = time.monotonic()
    entry = _customers.get(customer_id)
    if entry is not None and now - entry[0] < ttl:
        return entry[1]
    customer = Customer.objects.filter(id=customer_id).first()
    if ttl > 0:
        if len(_customers) >= _CUSTOMERS_MAX:
            _customers.clear()  # a bound, not an eviction policy: tokens of so many is rare
        _customers[customer_id] = (now, customer)
    return customer


def customer_cache_forget(*, customer_id: uuid.UUID) -> None:
    """Drop what this process remembers of a customer (it changed or was deleted)."""
    _customers.pop(customer_id, None)
