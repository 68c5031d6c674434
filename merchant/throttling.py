"""Per-customer rate limits: a fixed-window request counter per (scope, customer) in Redis.

Why not DRF's SimpleRateThrottle: it keeps each client's request history as one cached list
that every request reads, trims and writes back. Concurrent requests read the same list and the
last write wins, so under a parallel flood, the very case a limit exists for, most requests go
uncounted (with k requests in flight a client gets up to k times its rate); and every request
moves up to `rate` timestamps through pickle. Here one MULTI/EXEC round trip does INCR + EXPIRE
on an integer: atomic across all gunicorn workers and instances, O(1), exact. The price of a
fixed window is that a client can fit up to twice its rate around a window boundary; for abuse
protection, not billing, that is fine.

The key is the token's customer, never the client address: customers sit behind NATs and
proxies, and one customer's flood must not cost another anything.

Redis down means no limit (fail open, with a warning): failing closed would turn a Redis outage
into a refusal of every request, while the 202 only needs PostgreSQL. An unlimited request is
only load; the durable promise matters more than the limit.

Kept over DRF's SimpleRateThrottle for the reason above; django-ratelimit is a view decorator
outside DRF's throttle flow (its refusal is a 403 unless wired to a handler).
"""

import logging
import math
import time
import zlib
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from merchant.models import Customer

if TYPE_CHECKING:
    # Not at run time: rest_framework.views imports this module while it builds APIView.
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

# A view's `throttle_scope` -> the setting holding its rate. One budget per scope and customer:
# status, patient and de-link reads share "read". A customer view without a scope counts as a
# read, so an endpoint added later is limited before anyone thinks of it.
SCOPE_SETTINGS = {
    "link-create": "RATE_LIMIT_LINK_CREATE",
    "link-batch": "RATE_LIMIT_LINK_BATCH",
    "read": "RATE_LIMIT_READ",
}
DEFAULT_SCOPE = "read"

# DRF's rate syntax, `<count>/<period>`, where the period's first letter counts (config/settings.py
# refuses other spellings at start-up: "600/month" would be 600 a minute).
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# After a Redis error, requests pass unthrottled for this long without trying Redis again: with
# Redis black-holed each attempt would cost the ack path a full socket timeout.
FAIL_OPEN_SECONDS = 5.0
_fail_open_until = 0.0


@lru_cache(maxsize=16)
def parse_rate(rate: str) -> tuple[int, int] | None:
    """`"600/min"` -> (600, 60); `""` -> None (no limit)."""
    if not rate:
        return None
    count, _, period = rate.partition("/")
    if not count.isdigit() or int(count) < 1 or period[:1] not in _PERIOD_SECONDS:
        raise ImproperlyConfigured(f"bad rate {rate!r}: expected <count>/<s|min|hour|day>")
    return int(count), _PERIOD_SECONDS[period[0]]


class CustomerRateThrottle(BaseThrottle):
    """Limits each customer to its scope's rate; the view names the scope in `throttle_scope`."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: "APIView") -> bool:
        customer = request.user
        if not isinstance(customer, Customer):
            # No token (the schema, anything AllowAny): nothing to key on but the address, which
            # is shared behind NATs. Customer views refuse such requests with 401 before this.
            return True
        scope = getattr(view, "throttle_scope", DEFAULT_SCOPE)
        limit = parse_rate(getattr(settings, SCOPE_SETTINGS[scope]))
        if limit is None:
            return True
        allowed, period = limit
        # Each customer's windows start at an offset of their own, so clients throttled at once
        # that honour Retry-After do not all come back at the same instant. crc32, not hash():
        # the offset must be the same in every process.
        offset = zlib.crc32(customer.pk.bytes) % period
        window, elapsed = divmod(time.time() + offset, period)
        used = _count(f"throttle:{scope}:{customer.pk}:{int(window)}", ttl=period + 1)
        if used is None or used <= allowed:
            return True
        # Whole seconds, rounded up: Retry-After is an integer and must not invite an early retry.
        self._wait = math.ceil(period - elapsed)
        return False

    def wait(self) -> float | None:
        return self._wait


# INCR and, for a new window, EXPIRE: atomic, and one command (EVALSHA) per request.
_INCR_WINDOW = """
local used = redis.call('INCR', KEYS[1])
if used == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return used
"""


# Per cache object: Django's caches are per thread.
@lru_cache(maxsize=64)
def _counter(cache: RedisCache) -> Any:
    """The window counter as a script bound to one Redis client, made once per process: Django's
    cache makes a new client object per call, which costs more than the round trip."""
    client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
    return client.register_script(_INCR_WINDOW)


def _count(key: str, *, ttl: int) -> int | None:
    """Count this request in the window's counter; None when Redis cannot be reached."""
    global _fail_open_until
    if time.monotonic() < _fail_open_until:
        return None
    cache = caches[DEFAULT_CACHE_ALIAS]
    if not isinstance(cache, RedisCache):
        raise ImproperlyConfigured("rate limits need the default cache to be a RedisCache")
    cache_key = cache.make_and_validate_key(key)
    try:
        # Django's cache API has no atomic create-or-increment (incr() on a missing key
        # raises, add() + incr() is three round trips): a script does it in one.
        used = _counter(cache)(keys=[cache_key], args=[ttl])
    except (RedisError, OSError) as exc:
        _fail_open_until = time.monotonic() + FAIL_OPEN_SECONDS
        logger.warning(
            "rate limits off for %.0fs: Redis unavailable (%s)",
            FAIL_OPEN_SECONDS,
            type(exc).__name__,
        )
        return None
    return int(used)
