"""What the link API's views share: the Idempotency-Key header, the 202's headers, path ids,
and the problem for each refusal of a link request."""

import re

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter

from linking import services
from merchant.problems import Problem

# What idempotency_key_checked accepts; no space at either end (HTTP strips header values).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
_IDEMPOTENCY_KEY_FORM = re.compile(IDEMPOTENCY_KEY_PATTERN.strip("^$"))
CALLBACK_JSON_MAX_DEPTH = 64
# Text that reaches PostgreSQL, which refuses NUL characters (400 bad-request).
NO_NUL_PATTERN = r"^[^\x00]*$"

IDEMPOTENCY_KEY_HEADER = OpenApiParameter(
    name="Idempotency-Key",
    location=OpenApiParameter.HEADER,
    required=True,
    type={"type": "string", "minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY_PATTERN},
    description="A unique key per logical request (1-255 printable ASCII characters). A retry "
    "with the same key and body replays the first response for "
    "IDEMPOTENCY_TTL_SECONDS (24 h by default) with `Idempotent-Replayed: true`.",
)


ACCEPTED_HEADERS = [
    OpenApiParameter(
        "Location",
        str,
        OpenApiParameter.HEADER,
        response=[202],
        description="The status URL of the workflow.",
    ),
    OpenApiParameter(
        "Retry-After",
        int,
        OpenApiParameter.HEADER,
        response=[202, 409, 503],
        description="Seconds to wait before polling the status or retrying.",
    ),
    OpenApiParameter(
        "Idempotent-Replayed",
        str,
        OpenApiParameter.HEADER,
        response=[202],
        description="`true` when this is the replay of an earlier response for the same key.",
    ),
]


def path_id(name: str, description: str) -> OpenApiParameter:
    """An id in the path, documented as a UUID (the URLconf takes any string: a malformed id
    gets the same 404 as an unknown one)."""
    return OpenApiParameter(name, OpenApiTypes.UUID, OpenApiParameter.PATH, description=description)


def idempotency_key_checked(key: object) -> str:
    """The Idempotency-Key header's value (or a batch item's `idempotency-key`), checked."""
    if key is None:
        raise Problem("idempotency-key-missing")
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_FORM.fullmatch(key):
        raise Problem("idempotency-key-invalid")
    return key


def refusal_problem(exc: services.LinkRefused) -> Problem:
    """What POST /link answers for a request refused before anything was written."""
    if isinstance(exc, services.InsufficientDemographics):
        return Problem("insufficient-demographics", str(exc))
    if isinstance(exc, services.IdempotencyKeyReused):
        return Problem("idempotency-key-reused")
    if isinstance(exc, services.PatientAlreadyLinked):
        return Problem("patient-already-linked", extra={"workflow-id": str(exc.workflow_id)})
    if isinstance(exc, services.LinkInProgress):
        return Problem(
            "link-in-progress",
            extra={"workflow-id": str(exc.workflow_id)},
            headers={"Retry-After": str(services.STATUS_RETRY_AFTER_SECONDS)},
        )
    # RequestInFlight, the only other refusal: the same key is being accepted right now.
    return Problem(
        "idempotency-request-in-flight",
        headers={"Retry-After": str(services.IN_FLIGHT_RETRY_AFTER_SECONDS)},
    )
