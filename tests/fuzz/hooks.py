"""schemathesis hooks, loaded by the CLI from SCHEMATHESIS_HOOKS (see driver.py).

POST /link has two rules OpenAPI 3.0 cannot state, so its description says them in words: the
name has a letter (in any script: no regular expression both the fuzzer and the server read
means "a letter"), and the birth date is neither in the future nor more than 150 years ago (a
range that moves every day). Positive cases are brought inside those rules with as small a
change as possible; negative cases are left alone. Without this every other positive body
would be refused with 400, rightly, and the check that valid data is accepted would mean
nothing. Positive cases also behave like a client: a webhook URL on the host registered at
onboarding, and one Idempotency-Key per body (the generated key with the body's digest), else
nearly all of them would stop at a 422 (webhook-url-refused, idempotency-key-reused) and the
accepting path would hardly be fuzzed. Those 422s have tests of their own.

GET /links takes a `cursor` only as the service gave it (signed, for this customer and these
filters): no schema can say which strings those are, so a positive case is sent without the
cursor it drew, else each would get its rightful 400 (tests/linking/test_links_list.py follows
real cursors, and refuses tampered and foreign ones). Negative cases go as generated.

The search callback is authenticated by a Standard Webhooks signature over the exact body, not
by a token: unsigned, every fuzzed callback would stop at the 401 and the parser behind it would
never see hostile input. So every case whose signature headers were generated valid gets a
valid signature over the bytes actually sent, as if the internal system had sent it, bodies that
break the schema included: those must get 400 from the parser, never 200 or a 500. Cases whose
headers were made invalid or left out, or whose content type is not the documented one, go as
generated and must get 401.
"""

import datetime as dt
import hashlib
import json
import os
from typing import Any

import schemathesis
from schemathesis import Case
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation
from standardwebhooks.webhooks import Webhook

from tests.fuzz.driver import CALLBACK_SECRET_ENV, REGISTERED_WEBHOOK_ORIGIN

CALLBACK_PATH = "/internal/search-results/{search_id}"
CALLBACK_MEDIA_TYPE = "application/fhir+json"
# linking.serializers.fields.MAX_AGE_YEARS; this process has no Django to import it with.
MAX_AGE_YEARS = 150


def _is_positive(case: Case) -> bool:
    meta = case.meta
    return meta is not None and not meta.generation.mode.is_negative


def _with_letter(name: str) -> str:
    """The name with its first visible character replaced by a letter: same length, same
    spacing, still matching the schema's pattern."""
    if any(ch.isalpha() for ch in name):
        return name
    stripped = name.lstrip()
    index = len(name) - len(stripped)
    return f"{name[:index]}A{name[index + 1 :]}" if stripped else name


def _plausible_birth_date(value: str) -> str:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return value
    today = dt.date.today()
    if today.year - MAX_AGE_YEARS < day.year < today.year:
        return value
    year = today.year - 1 - day.year % (MAX_AGE_YEARS - 1)
    return day.replace(year=year, day=min(day.day, 28)).isoformat()


def _link_rules(case: Case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    webhook = body.get("webhook")
    if isinstance(webhook, str):
        # Keep the generated path and query, on the registered host.
        _scheme, _, rest = webhook.partition("://")
        _host, slash, path = rest.partition("/")
        body["webhook"] = f"{REGISTERED_WEBHOOK_ORIGIN}{slash}{path}"
    headers = case.headers
    key = headers.get("Idempotency-Key") if headers is not None else None
    if headers is not None and isinstance(key, str):
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        headers["Idempotency-Key"] = f"{key[:238]}-{digest}"
    patient = body.get("patient")
    if not isinstance(patient, dict):
        return
    name, dob = patient.get("full_name"), patient.get("dob")
    if isinstance(name, str):
        patient["full_name"] = _with_letter(name)
    if isinstance(dob, str):
        patient["dob"] = _plausible_birth_date(dob)


def _body_bytes(body: Any) -> bytes:
    """The body as schemathesis would send it as JSON, encoded once so that the signature
    covers exactly these bytes."""
    if isinstance(body, NotSet):
        return b""
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=False).encode()


@schemathesis.hook
def before_call(context: Any, case: Case, kwargs: dict[str, Any]) -> None:
    """Every phase's every request passes here (map_case would miss the coverage phase's)."""
    if (case.operation.path, case.method.upper()) == ("/link", "POST") and _is_positive(case):
        _link_rules(case)
    elif (case.operation.path, case.method.upper()) == (CALLBACK_PATH, "POST"):
        _sign_callback(case, kwargs)
    elif (case.operation.path, case.method.upper()) == ("/links", "GET") and _is_positive(case):
        _without_cursor(case, kwargs)


def _without_cursor(case: Case, kwargs: dict[str, Any]) -> None:
    for query in (case.query, kwargs.get("params")):
        if isinstance(query, dict):
            query.pop("cursor", None)


def _sign_callback(case: Case, kwargs: dict[str, Any]) -> None:
    secret = os.environ.get(CALLBACK_SECRET_ENV)
    meta = case.meta
    if (
        not secret
        or meta is None
        or meta.is_negative_at(ParameterLocation.HEADER)
        or case.media_type != CALLBACK_MEDIA_TYPE
    ):
        return
    body = _body_bytes(case.body)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return  # not a JSON body the internal system could send: left unsigned, must get 401
    headers = case.headers if case.headers is not None else {}
    message_id = str(headers.get("webhook-id") or "fuzz")
    now = dt.datetime.now(dt.UTC)
    headers["webhook-id"] = message_id
    headers["webhook-timestamp"] = str(int(now.timestamp()))
    headers["webhook-signature"] = Webhook(secret).sign(message_id, now, text)
    case.headers = headers
    kwargs["data"] = body
