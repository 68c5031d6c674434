"""The circuit breaker on the internal system, shared by every process through Redis.

Closed, work is published and searched. Consecutive transient failures (connection refused or
reset, timeouts, 502/503/504: INTERNAL_SEARCH_BREAKER_FAILURES of them with no success between)
open it: the scheduler publishes no search, and the consumers put back what they hold with the
attempt not counted. While open, the scheduler alone probes the internal system (FHIR's
`GET [base]/metadata`, contract section 4) once every INTERNAL_SEARCH_BREAKER_PROBE_SECONDS; the
first probe that answers closes it. Apart from that, a 429's Retry-After pauses every search
until then (`paused_until`), whatever the state.

The state is one Redis hash, changed by Lua scripts so that two workers reporting at once cannot
lose a count or open it twice. A consumer reports a wave of answers at a time (one round trip,
not one per search), and only when it has something to say: a failure, or a success while
failures were counted. Redis unreachable: the breaker reads closed (the attempt limit and the
deadline still bound each workflow, as before there was a breaker) and says so in the log.

Hand-written: pybreaker (with its CircuitRedisStorage) was weighed and installed to try. Its
`call` holds one process-wide lock for the whole guarded call, which would run a worker's 200
concurrent searches one at a time; its half-open trial is the next real call (a search for a
patient) where ours is the metadata probe, run by one process; it costs two Redis round trips
per call; and it has no notion of a Retry-After pause. The state machine it would give is the
twenty lines below.
"""

import dataclasses
import logging
import time
from typing import Any

import redis
from django.conf import settings

from workflows import concurrent, metrics

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"


@dataclasses.dataclass(frozen=True)
class BreakerState:
    state: str = CLOSED
    # Consecutive transient failures counted while closed.
    failures: int = 0
    # When the state last changed, and when a probe is next due (epoch seconds).
    since: float = 0.0
    probe_at: float = 0.0
    # No search before this (a 429's Retry-After), epoch seconds; 0 for none.
    paused_until: float = 0.0
    # False when Redis could not be read (the state above is then the default: closed).
    known: bool = True

    @property
    def open(self) -> bool:
        return self.state == OPEN

    def blocks(self, now: float | None = None) -> bool:
        """True while no search may start: open, or paused by a 429."""
        return self.open or self.paused_until > (time.time() if now is None else now)

    def resumes_at(self) -> float:
        """When searches may start again, as far as is known (epoch seconds): the end of a
        pause, or for an open breaker its next probe."""
        return max(self.paused_until, self.probe_at if self.open else 0.0)


# report(successes, failures, threshold, now, pause_until, probe_every) -> state fields after.
_REPORT = """
local key = KEYS[1]
local successes, failures, threshold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, pause, every = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if pause > tonumber(redis.call('HGET', key, 'paused_until') or '0') then
  redis.call('HSET', key, 'paused_until', pause)
end
local state = redis.call('HGET', key, 'state') or 'closed'
local opened = 0
if state == 'closed' then
  local count = tonumber(redis.call('HGET', key, 'failures') or '0')
  if successes > 0 then count = 0 end
  count = count + failures
  if count >= threshold then
    redis.call('HSET', key, 'state', 'open', 'failures', 0, 'since', now, 'probe_at', now + every)
    opened = 1
  else
    redis.call('HSET', key, 'failures', count)
  end
end
return {opened, unpack(redis.call('HGETALL', key))}
"""

# probe_due(now, probe_every) -> 1 when the caller is to probe now (the next one is booked).
_PROBE_DUE = """
local key = KEYS[1]
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
local now = tonumber(ARGV[1])
if now < tonumber(redis.call('HGET', key, 'probe_at') or '0') then return 0 end
redis.call('HSET', key, 'probe_at', now + tonumber(ARGV[2]))
return 1
"""

# close(now) -> 1 when it was open.
_CLOSE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'since', ARGV[1])
return 1
"""


def _client() -> redis.Redis:
    # Short timeouts: a stalled Redis must not stall a batch (the breaker then reads closed).
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)


_redis = concurrent.PerProcess(_client)


def _key() -> str:
    # One breaker per deployment: the queue's name tells deployments sharing a Redis apart.
    return f"merchant:{settings.CELERY_TASK_DEFAULT_QUEUE}:breaker:internal-search"


def _parse(fields: Any) -> BreakerState:
    values = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in (
            fields.items()
            if isinstance(fields, dict)
            else zip(fields[::2], fields[1::2], strict=True)
        )
    }
    return BreakerState(
        state=values.get("state", CLOSED),
        failures=int(float(values.get("failures", 0))),
        since=float(values.get("since", 0)),
        probe_at=float(values.get("probe_at", 0)),
        paused_until=float(values.get("paused_until", 0)),
    )


def _unknown(exc: Exception) -> BreakerState:
    logger.warning("breaker: Redis unavailable (%s); reading the breaker as closed", exc)
    return BreakerState(known=False)


def breaker_state() -> BreakerState:
    """The breaker as it is now (one Redis round trip)."""
    try:
        return _parse(_redis.get().hgetall(_key()))
    except redis.RedisError as exc:
        return _unknown(exc)


def breaker_report(
    *, successes: int, failures: int, retry_after: float | None = None
) -> BreakerState:
    """Count a wave of answers from the internal system: `failures` transient ones (the kinds
    that open the breaker), `successes` answered ones; a 429's `retry_after` pauses every search.
    The breaker after it; the one call that opens it logs so."""
    now = time.time()
    pause = now + retry_after if retry_after else 0.0
    try:
        reply = _redis.get().eval(
            _REPORT,
            1,
            _key(),
            successes,
            failures,
            settings.INTERNAL_SEARCH_BREAKER_FAILURES,
            now,
            pause,
            settings.INTERNAL_SEARCH_BREAKER_PROBE_SECONDS,
        )
    except redis.RedisError as exc:
        return _unknown(exc)
    state = _parse(reply[1:])
    if reply[0]:
        logger.warning(
            "breaker: opened after %d consecutive transient failures of the internal system; "
            "no search is published until its probe (GET metadata) answers",
            settings.INTERNAL_SEARCH_BREAKER_FAILURES,
        )
        metrics.breaker_changed(opened=True)
    elif pause:
        logger.warning(
            "breaker: the internal system asked for %.1f s without searches (429)", pause - now
        )
    return state


def breaker_probe_due() -> bool:
    """True when the breaker is open and its next probe is due now; that probe is then booked
    (the next one is INTERNAL_SEARCH_BREAKER_PROBE_SECONDS later, whatever this one answers)."""
    try:
        return bool(
            _redis.get().eval(
                _PROBE_DUE, 1, _key(), time.time(), settings.INTERNAL_SEARCH_BREAKER_PROBE_SECONDS
            )
        )
    except redis.RedisError as exc:
        _unknown(exc)
        return False


def breaker_close() -> bool:
    """Close the breaker (its probe answered); True when it was open (logged)."""
    try:
        closed = bool(_redis.get().eval(_CLOSE, 1, _key(), time.time()))
    except redis.RedisError as exc:
        _unknown(exc)
        return False
    if closed:
        logger.warning("breaker: closed: the internal system answers its probe; searches resume")
        metrics.breaker_changed(opened=False)
    return closed


def breaker_reset() -> None:
    """Forget the breaker's state (tests; an operator after a drill)."""
    try:
        _redis.get().delete(_key())
    except redis.RedisError as exc:
        _unknown(exc)
