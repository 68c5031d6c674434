"""RFC 9457 problem details: every error the API returns, with a stable `type` per kind.

Each type URI is relative (`/problems/<slug>`), resolves against the API's own origin and serves
a short description there, so a client can always dereference it.

Hand-written, not drf-standardized-errors: that library renders its own format
(`{"type": "validation_error", "errors": [...]}`), not RFC 9457 problem+json with a
dereferenceable `type` per kind, which is this API's contract.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, DataError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    slug: str
    title: str
    status: int
    description: str

    @property
    def uri(self) -> str:
        return f"/problems/{self.slug}"


def _catalog(*types: ProblemType) -> dict[str, ProblemType]:
    return {t.slug: t for t in types}


PROBLEMS = _catalog(
    ProblemType(
        "validation-error",
        "Invalid request",
        400,
        "The body failed validation; `errors` lists each failing field.",
    ),
    ProblemType("bad-request", "Bad request", 400, "The request could not be understood."),
    ProblemType("malformed-json", "Malformed JSON", 400, "The body is not valid JSON."),
    ProblemType(
        "idempotency-key-missing",
        "Idempotency-Key required",
        400,
        "POST /link needs an `Idempotency-Key` header.",
    ),
    ProblemType(
        "idempotency-key-invalid",
        "Invalid Idempotency-Key",
        400,
        "The key must be 1 to 255 printable ASCII characters.",
    ),
    ProblemType(
        "unauthorized",
        "Unauthorized",
        401,
        "A valid customer token is required in the `customer-token` header "
        "(or `Authorization: Bearer`).",
    ),
    ProblemType("forbidden", "Forbidden", 403, "This operation is not allowed."),
    ProblemType("not-found", "Not found", 404, "No such resource for this customer."),
    ProblemType(
        "method-not-allowed",
        "Method not allowed",
        405,
        "The resource does not support this method.",
    ),
    ProblemType("not-acceptable", "Not acceptable", 406, "Responses are JSON only."),
    ProblemType(
        "idempotency-request-in-flight",
        "Request in flight",
        409,
        "A request with this Idempotency-Key is still being processed; retry after "
        "`Retry-After` seconds.",
    ),
    ProblemType(
        "patient-already-linked",
        "Patient already linked",
        409,
        "This patient is already linked; `workflow-id` names the workflow that linked it.",
    ),
    ProblemType(
        "link-in-progress",
        "Link in progress",
        409,
        "A link request for this patient is still being processed; `workflow-id` names it.",
    ),
    ProblemType(
        "not-in-review",
        "Not awaiting a decision",
        409,
        "The workflow is not in REVIEW: there is nothing to decide (its status says where it is).",
    ),
    ProblemType(
        "review-decided",
        "Already decided",
        409,
        "Another decision already ended this review; the same decision again is answered 200.",
    ),
    ProblemType(
        "review-by-operator",
        "Reviewed by our operators",
        409,
        "This customer's reviews are decided by our operators, not through the API.",
    ),
    ProblemType(
        "unknown-candidate",
        "Unknown candidate",
        422,
        "No candidate of this review has that `candidate-id` (see GET /link/status).",
    ),
    ProblemType("payload-too-large", "Payload too large", 413, "The body is larger than 64 KiB."),
    ProblemType(
        "unsupported-media-type",
        "Unsupported media type",
        415,
        "Send the body as `application/json`.",
    ),
    ProblemType(
        "insufficient-demographics",
        "Not enough to match safely",
        422,
        "The demographics are too thin, or the name is a placeholder; `detail` says which.",
    ),
    ProblemType(
        "idempotency-key-reused",
        "Idempotency-Key reused",
        422,
        "This Idempotency-Key was already used with a different body.",
    ),
    ProblemType(
        "webhook-url-refused",
        "Webhook URL refused",
        422,
        "The webhook URL is well formed but names a destination webhooks are never sent to "
        "(not https, not a public host, or not the host registered at onboarding); `detail` "
        "says which.",
    ),
    ProblemType(
        "rate-limited", "Too many requests", 429, "Slow down; retry after `Retry-After` seconds."
    ),
    ProblemType(
        "internal-error",
        "Internal error",
        500,
        "Something failed on our side; the request can be retried with the same Idempotency-Key.",
    ),
    ProblemType(
        "service-unavailable",
        "Service unavailable",
        503,
        "A dependency is unavailable; nothing was recorded. Retry after `Retry-After` "
        "seconds with the same Idempotency-Key.",
    ),
    ProblemType(
        "not-ready",
        "Not ready",
        503,
        "GET /readyz only: a dependency of this instance is unreachable, slow or not migrated; "
        "`failed` names them and `checks` gives each dependency's state.",
    ),
)


class Problem(exceptions.APIException):
    """An API error rendered as problem+json; `extra` becomes extension members."""

    def __init__(
        self,
        slug: str,
        detail: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.problem = PROBLEMS[slug]
        self.status_code = self.problem.status
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        super().__init__(detail or self.problem.description)


def problem_body(
    slug: str, *, detail: str | None = None, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    problem = PROBLEMS[slug]
    body: dict[str, Any] = {
        "type": problem.uri,
        "title": problem.title,
        "status": problem.status,
        "detail": detail or problem.description,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(
    slug: str,
    *,
    detail: str | None = None,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = problem_body(slug, detail=detail, instance=instance, **extra)
    return Response(
        body, status=body["status"], headers=dict(headers or {}), content_type=PROBLEM_CONTENT_TYPE
    )


def _validation_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten DRF's nested error structure into [{field: "patient.dob", detail: "..."}]."""
    if isinstance(detail, Mapping):
        out: list[dict[str, str]] = []
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else f"{prefix}.{key}" if prefix else key
            out.extend(_validation_errors(value, str(name)))
        return out
    if isinstance(detail, list):
        if all(isinstance(item, str) for item in detail):
            return [{"field": prefix or "body", "detail": str(item)} for item in detail]
        out = []
        for index, item in enumerate(detail):
            out.extend(_validation_errors(item, f"{prefix}[{index}]"))
        return out
    return [{"field": prefix or "body", "detail": str(detail)}]


def problem_of(
    exc: Problem | exceptions.ValidationError, *, instance: str | None = None
) -> dict[str, Any]:
    """The problem+json body the API answers for a Problem or a validation error (also what a
    POST /link/batch item that fails says, in the batch's answer)."""
    if isinstance(exc, Problem):
        return problem_body(
            exc.problem.slug, detail=str(exc.detail), instance=instance, **exc.extra
        )
    return problem_body(
        "validation-error", instance=instance, errors=_validation_errors(exc.detail)
    )


_DRF_SLUGS: dict[type[exceptions.APIException], str] = {
    exceptions.NotAuthenticated: "unauthorized",
    exceptions.AuthenticationFailed: "unauthorized",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not-found",
    exceptions.MethodNotAllowed: "method-not-allowed",
    exceptions.NotAcceptable: "not-acceptable",
    exceptions.UnsupportedMediaType: "unsupported-media-type",
    exceptions.ParseError: "malformed-json",
    exceptions.Throttled: "rate-limited",
}


def problem_exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response:
    """DRF exception handler: every failure becomes problem+json, never a stack trace."""
    request = context.get("request")
    instance = request.path if request is not None else None
    if isinstance(exc, (Problem, exceptions.ValidationError)):
        body = problem_of(exc, instance=instance)
        return Response(
            body,
            status=body["status"],
            headers=exc.headers if isinstance(exc, Problem) else {},
            content_type=PROBLEM_CONTENT_TYPE,
        )
    if isinstance(exc, Http404):
        return problem_response("not-found", instance=instance)
    if isinstance(exc, RequestDataTooBig):
        # Django's DATA_UPLOAD_MAX_MEMORY_SIZE, hit when DRF reads the body for the parser.
        return problem_response("payload-too-large", instance=instance)
    if isinstance(exc, exceptions.APIException):
        slug = next((s for cls, s in _DRF_SLUGS.items() if isinstance(exc, cls)), None)
        if slug is None:
            slug = "internal-error" if exc.status_code >= 500 else "validation-error"
        headers = {}
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = str(auth_header)
        wait = getattr(exc, "wait", None)
        if wait is not None:
            headers["Retry-After"] = str(max(1, int(wait)))
        # One body for every authentication failure: the reason is never disclosed.
        detail = None if slug in {"unauthorized", "malformed-json"} else str(exc.detail)
        return problem_response(slug, detail=detail, instance=instance, headers=headers)
    if isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("database unavailable: %s", type(exc).__name__)
        return problem_response(
            "service-unavailable", instance=instance, headers={"Retry-After": "5"}
        )
    if isinstance(exc, DataError):
        # PostgreSQL's "data exception" (SQLSTATE class 22): a value it cannot store or compare,
        # such as a NUL character or a string longer than its column. Here such values come from
        # the request (an id in the path, a header): the same request fails every time, so it is
        # the client's error, not a 500 that invites retries. Views should refuse them earlier;
        # this is the net under them (found by the fuzzer, tests/test_fuzz_findings.py).
        logger.warning("database refused a value of the request on %s", instance)
        return problem_response(
            "bad-request",
            detail="The request carries a value that cannot be processed (such as a NUL "
            "character or an over-long identifier).",
            instance=instance,
        )
    if isinstance(exc, RecursionError):
        # Only hostile input nests deep enough (JSON parsed outside the API's parser).
        logger.warning("input nested too deeply on %s", instance)
        return problem_response(
            "bad-request", detail="The request is nested too deeply.", instance=instance
        )
    if isinstance(exc, DatabaseError):
        logger.error("database error: %s", type(exc).__name__)
    else:
        logger.error("unhandled %s on %s", type(exc).__name__, instance)
    return problem_response("internal-error", instance=instance)


# --- Django-level handlers: errors outside DRF views are problem+json too ----------------------


def _django_problem(request: HttpRequest, slug: str) -> JsonResponse:
    body = problem_body(slug, instance=request.path)
    return JsonResponse(body, status=body["status"], content_type=PROBLEM_CONTENT_TYPE)


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _django_problem(request, "not-found")


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _django_problem(request, "bad-request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _django_problem(request, "forbidden")


def handler500(request: HttpRequest) -> JsonResponse:
    return _django_problem(request, "internal-error")


def problem_type_view(request: HttpRequest, slug: str) -> JsonResponse:
    """Dereferenceable documentation of a problem type."""
    problem = PROBLEMS.get(slug)
    if problem is None:
        return _django_problem(request, "not-found")
    return JsonResponse(
        {
            "type": problem.uri,
            "title": problem.title,
            "status": problem.status,
            "description": problem.description,
        }
    )
