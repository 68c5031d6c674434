"""Mutable, thread-safe server state: knobs, scripted behaviours, counters and async jobs."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from standin.matching import PatientIndex, normalise_name
from standin.webhooks import WebhookSender

REQUEST_LOG_SIZE = 200
# "" = up; "503" = every FHIR call answered 503; "hang" = every FHIR call read and never answered.
# A refused connection is not a knob: the harness stops the server (see StandinServer).
OUTAGES = ("", "503", "hang")
# The FHIR calls an outage meets, counted apart (stats "outage_calls"): the liveness probe, the
# searches, the reads, the job polls, anything else.
CALL_KINDS = ("metadata", "match", "read", "poll", "other")
CONFIG_KEYS = frozenset(
    {"latency_ms", "failure_rate", "async_delay_ms", "outage", "family_latency_ms"}
)


@dataclass(frozen=True)
class Config:
    latency_ms: int = 0
    failure_rate: float = 0.0
    # Negative means "never on its own": jobs stay pending until /_control/complete-jobs.
    async_delay_ms: int = 0
    outage: str = ""
    # Extra milliseconds for a $match whose query's family name is a key (normalised as the
    # matcher does): searches of some patients slow, of the others not (a noisy neighbour).
    family_latency_ms: dict[str, int] = field(default_factory=dict)

    def updated(self, changes: Any) -> Config:
        """Apply a /_control/config body; raises ValueError on unknown keys or bad values."""
        if not isinstance(changes, dict):
            raise ValueError("config body must be a JSON object")
        unknown = set(changes) - CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        for key in ("latency_ms", "async_delay_ms"):
            if key in changes and not _is_int(changes[key]):
                raise ValueError(f"{key} must be an integer")
        if changes.get("latency_ms", 0) < 0:
            raise ValueError("latency_ms must be >= 0")
        rate = changes.get("failure_rate", 0.0)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise ValueError("failure_rate must be a number between 0 and 1")
        if "failure_rate" in changes:
            changes = {**changes, "failure_rate": float(rate)}
        if changes.get("outage", "") not in OUTAGES:
            raise ValueError(f"outage must be one of {list(OUTAGES)}")
        if "family_latency_ms" in changes:
            changes = {
                **changes,
                "family_latency_ms": _family_latency(changes["family_latency_ms"]),
            }
        return replace(self, **changes)

    def latency_for_family(self, family: str) -> int:
        """The extra milliseconds for a $match whose query has this (normalised) family name."""
        return self.family_latency_ms.get(family, 0) if family else 0


def _family_latency(raw: Any) -> dict[str, int]:
    """{"<family name>": milliseconds >= 0, ...} with the names normalised; {} clears it."""
    if not isinstance(raw, dict):
        raise ValueError("family_latency_ms must be an object of family name -> milliseconds")
    rules: dict[str, int] = {}
    for name, delay in raw.items():
        key = normalise_name(name)
        if not key:
            raise ValueError("family_latency_ms keys must be non-empty names")
        if not _is_int(delay) or delay < 0:
            raise ValueError("family_latency_ms values must be integers >= 0")
        rules[key] = delay
    return rules


@dataclass(frozen=True)
class ScriptStep:
    status: int = 200
    delay_ms: int = 0
    retry_after: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> ScriptStep:
        if not isinstance(raw, dict) or set(raw) - {"status", "delay_ms", "retry_after"}:
            raise ValueError("each response must be an object with status/delay_ms/retry_after")
        step = cls(**raw)
        if not _is_int(step.status) or not (step.status == 200 or 400 <= step.status <= 599):
            raise ValueError("status must be 200 or 400-599")
        if not _is_int(step.delay_ms) or step.delay_ms < 0:
            raise ValueError("delay_ms must be an integer >= 0")
        if step.retry_after is not None and (not _is_int(step.retry_after) or step.retry_after < 0):
            raise ValueError("retry_after must be an integer >= 0")
        return step


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Job:
    bundle: dict[str, Any]
    done: bool = False
    timer: threading.Timer | None = None


class State:
    def __init__(
        self,
        patients: PatientIndex,
        config: Config,
        seed: int,
        token: str | None,
        webhooks: WebhookSender | None,
    ) -> None:
        self.patients = patients
        self.token = token
        self._startup_config = config
        self._seed = seed
        self._webhooks = webhooks
        self._lock = threading.Lock()
        # Wakes the calls held by a "hang" outage when the config changes or the server closes.
        self._config_changed = threading.Condition(self._lock)
        # A gauge, not a counter: reset does not touch it (the held calls are still held).
        self._calls_hanging = 0
        self._closed = False
        self._reset_locked()

    def _reset_locked(self) -> None:
        self.config = self._startup_config
        # A seeded PRNG makes the injected-failure sequence reproducible; not security relevant.
        self._rng = random.Random(self._seed)  # noqa: S311
        self._script: deque[ScriptStep] = deque()
        self._jobs: dict[str, Job] = {}
        self._counters = dict.fromkeys(
            (
                "match_calls",
                "read_calls",
                "job_polls",
                "metadata_calls",
                "calls_during_outage",
                "callbacks_sent",
                "callback_failures",
            ),
            0,
        )
        self._outage_calls = dict.fromkeys(CALL_KINDS, 0)
        self._requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    def reset(self) -> None:
        with self._lock:
            self._cancel_timers_locked()
            self._reset_locked()
            # Back to the start-up config: a call held by a "hang" outage may be released.
            self._config_changed.notify_all()

    def close(self) -> None:
        with self._lock:
            self._cancel_timers_locked()
            # A closed server has no one left to clear the outage: release the held calls now.
            self._closed = True
            self._config_changed.notify_all()

    def _cancel_timers_locked(self) -> None:
        for job in self._jobs.values():
            if job.timer is not None:
                job.timer.cancel()

    def set_config(self, changes: Any) -> Config:
        with self._lock:
            self.config = self.config.updated(changes)
            self._config_changed.notify_all()
            return self.config

    def queue_script(self, raw: Any) -> int:
        if not isinstance(raw, dict) or not isinstance(raw.get("responses"), list):
            raise ValueError('script body must be {"responses": [...]}')
        steps = [ScriptStep.parse(item) for item in raw["responses"]]
        with self._lock:
            self._script.extend(steps)
            return len(self._script)

    def count(self, counter: str) -> None:
        with self._lock:
            self._counters[counter] += 1

    def outage_for_call(self, kind: str = "other") -> str:
        """The outage a FHIR call of this kind (CALL_KINDS) meets on arrival ("" if none);
        counts the call, in total and by kind, if there is one.

        Read and counted under one lock so a scenario's count agrees with the answers given."""
        with self._lock:
            outage = self.config.outage
            if outage:
                self._counters["calls_during_outage"] += 1
                self._outage_calls[kind if kind in self._outage_calls else "other"] += 1
            return outage

    def hold_while_hanging(self, max_seconds: float) -> None:
        """Block a FHIR call until the "hang" outage ends (config change, reset, close) or
        ``max_seconds`` pass, so no handler thread outlives a forgotten outage for long."""
        with self._config_changed:
            self._calls_hanging += 1
            try:
                self._config_changed.wait_for(
                    lambda: self.config.outage != "hang" or self._closed, max_seconds
                )
            finally:
                self._calls_hanging -= 1

    def next_match_behaviour(self) -> ScriptStep:
        """Called once per $match: a scripted step if queued, else the failure-rate draw."""
        with self._lock:
            self._counters["match_calls"] += 1
            if self._script:
                return self._script.popleft()
            # Draw on every unscripted call (even at rate 0) so that the sequence of outcomes for
            # a seed does not depend on when the rate was changed.
            failed = self._rng.random() < self.config.failure_rate
            return ScriptStep(status=500 if failed else 200)

    def record_request(self, method: str, path: str, status: int | None) -> None:
        """``status`` None: the call was never answered (a "hang" outage)."""
        with self._lock:
            self._requests.append({"method": method, "path": path, "status": status})

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._counters,
                "outage_calls": dict(self._outage_calls),
                "calls_hanging": self._calls_hanging,
                "requests": list(self._requests),
            }

    def create_job(self, bundle: dict[str, Any]) -> str:
        search_id = uuid.uuid4().hex
        with self._lock:
            job = Job(bundle)
            self._jobs[search_id] = job
            delay_ms = self.config.async_delay_ms
            if delay_ms > 0:
                job.timer = threading.Timer(delay_ms / 1000, self._complete, args=(search_id,))
                job.timer.daemon = True
                job.timer.start()
        if delay_ms == 0:
            self._complete(search_id)
        return search_id

    def poll_job(self, search_id: str) -> tuple[bool, dict[str, Any]] | None:
        """(done, bundle) for a known job, None for an unknown search id."""
        with self._lock:
            self._counters["job_polls"] += 1
            job = self._jobs.get(search_id)
            return None if job is None else (job.done, job.bundle)

    def complete_all_jobs(self) -> int:
        with self._lock:
            pending = [search_id for search_id, job in self._jobs.items() if not job.done]
        for search_id in pending:
            self._complete(search_id)
        return len(pending)

    def _complete(self, search_id: str) -> None:
        with self._lock:
            job = self._jobs.get(search_id)
            # Timer and complete-jobs may race; only the first completion fires the callback.
            if job is None or job.done:
                return
            job.done = True
            if job.timer is not None:
                job.timer.cancel()
        if self._webhooks is not None:
            body = json.dumps(job.bundle).encode()
            self._webhooks.send(search_id, body, self._count_callback)

    def _count_callback(self, ok: bool) -> None:
        self.count("callbacks_sent" if ok else "callback_failures")
