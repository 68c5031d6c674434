"""The link API, and the internal system's search callback. Views parse and call services."""

import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from linking import services
from linking.internal_search import InternalSearchError, parse_bundle
from linking.metrics import AckMeteredApi
from linking.selectors import (
    LINKS_LIMIT_DEFAULT,
    LINKS_LIMIT_MAX,
    link_batch_status,
    link_status_for_customer,
    links_page,
)
from linking.serializers.batch import (
    LinkBatchAcceptedSerializer,
    LinkBatchInputSerializer,
    LinkBatchStatusSerializer,
)
from linking.serializers.links import (
    DelinkOutputSerializer,
    LinkAcceptedSerializer,
    LinkCreateInputSerializer,
    LinkDecisionInputSerializer,
    LinkStatusOutputSerializer,
)
from linking.serializers.listing import (
    LINKS_CURSOR_MAX_LENGTH,
    LINKS_CURSOR_PATTERN,
    LinksListOutputSerializer,
    LinksListQuerySerializer,
)
from linking.serializers.patients import PatientOutputSerializer
from linking.serializers.search import SearchResultReceiptSerializer, SearchsetBundleSerializer
from merchant.auth import request_customer
from merchant.parsers import BatchJSONParser, json_loads_limited
from merchant.problems import Problem, problem_of
from merchant.schema import problem_responses

# What _idempotency_key accepts; no space at either end, as HTTP strips it from header values.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
_IDEMPOTENCY_KEY_FORM = re.compile(IDEMPOTENCY_KEY_PATTERN.strip("^$"))
CALLBACK_JSON_MAX_DEPTH = 64
# Text that reaches PostgreSQL, which refuses NUL characters (400 bad-request).
NO_NUL_PATTERN = r"^[^\x00]*$"

_IDEMPOTENCY_KEY = OpenApiParameter(
    name="Idempotency-Key",
    location=OpenApiParameter.HEADER,
    required=True,
    type={"type": "string", "minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY_PATTERN},
    description="A unique key per logical request (1-255 printable ASCII characters). A retry "
    "with the same key and body replays the first response for "
    "IDEMPOTENCY_TTL_SECONDS (24 h by default) with `Idempotent-Replayed: true`.",
)


_ACCEPTED_HEADERS = [
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


def _path_id(name: str, description: str) -> OpenApiParameter:
    """An id in the path, documented as a UUID (the URLconf takes any string: a malformed id
    gets the same 404 as an unknown one)."""
    return OpenApiParameter(name, OpenApiTypes.UUID, OpenApiParameter.PATH, description=description)


def _idempotency_key(key: object) -> str:
    """The Idempotency-Key header's value (or a batch item's `idempotency-key`), checked."""
    if key is None:
        raise Problem("idempotency-key-missing")
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_FORM.fullmatch(key):
        raise Problem("idempotency-key-invalid")
    return key


def _refusal_problem(exc: services.LinkRefused) -> Problem:
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


class LinkCreateApi(AckMeteredApi):  # counts and times every answer (linking/metrics.py)
    throttle_scope = "link-create"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_create",
        summary="Ask for a customer patient to be linked",
        parameters=[_IDEMPOTENCY_KEY, *_ACCEPTED_HEADERS],
        request=LinkCreateInputSerializer,
        responses={
            (202, "application/json"): OpenApiResponse(
                LinkAcceptedSerializer,
                description="Accepted: the request is durable and will reach a final state. "
                "Headers: `Location` (the status URL), `Retry-After`, and "
                "`Idempotent-Replayed: true` on a replay.",
            ),
            **problem_responses(400, 401, 409, 413, 415, 422, 503),
        },
        examples=[
            OpenApiExample(
                "Link request",
                request_only=True,
                value={
                    "patient": {
                        "id": "5f0c7d1e-3b7a-4a53-9a52-1c2d3e4f5a6b",
                        "full_name": "Jane Q Doe",
                        "dob": "1980-04-02",
                        "contact": {
                            "address": "1 Main St, Springfield",
                            "phone": "+1-555-0100",
                            "email": "jane@example.org",
                        },
                        "insurance": {"payer": "Acme Health", "member_id": "A123"},
                    }
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        key = _idempotency_key(request.headers.get("idempotency-key"))
        serializer = LinkCreateInputSerializer(
            data=request.data, context={"customer": request_customer(request)}
        )
        serializer.is_valid(raise_exception=True)
        try:
            accepted = services.link_accept(
                customer=request_customer(request),
                idempotency_key=key,
                body=request.data,
                request_data=serializer.canonical(),
            )
        except services.LinkRefused as exc:
            raise _refusal_problem(exc) from exc
        return Response(accepted.body, status=accepted.status, headers=accepted.headers)


class LinkBatchCreateApi(APIView):
    throttle_scope = "link-batch"  # merchant/throttling.py: batches, in a budget of their own
    parser_classes = [BatchJSONParser]

    @extend_schema(
        operation_id="link_batch_create",
        summary="Ask for many customer patients to be linked at once",
        description="Each item of `requests` is exactly a POST /link: the same validation, "
        "the same refusals, its own `idempotency-key` (a replay answers its first workflow), "
        "the same workflow and webhooks. A refused item is answered with its problem and never "
        "refuses the others; every accepted item is durable before the 202 (one transaction). "
        "At most LINK_BATCH_MAX_ITEMS (1000) items. The batch's own Idempotency-Key replays "
        "the whole answer. GET /link/batch/{batch_id} reports the items' progress.",
        parameters=[_IDEMPOTENCY_KEY],
        request=LinkBatchInputSerializer,
        responses={
            (202, "application/json"): OpenApiResponse(
                LinkBatchAcceptedSerializer,
                description="Accepted: every item's workflow-id or problem. Headers: "
                "`Location` (the batch's status URL), `Idempotent-Replayed: true` on a replay.",
            ),
            **problem_responses(400, 401, 409, 413, 415, 422, 503),
        },
    )
    def post(self, request: Request) -> Response:
        key = _idempotency_key(request.headers.get("idempotency-key"))
        envelope = LinkBatchInputSerializer(data=request.data)
        envelope.is_valid(raise_exception=True)
        validator = LinkCreateInputSerializer(context={"customer": request_customer(request)})
        items = [_batch_item(raw, validator) for raw in envelope.validated_data["requests"]]
        try:
            accepted = services.link_accept_batch(
                customer=request_customer(request),
                idempotency_key=key,
                fingerprint=services.request_fingerprint(request.data),
                items=items,
                refusal_problem=lambda exc: problem_of(_refusal_problem(exc)),
            )
        except services.LinkRefused as exc:  # the batch's own key: reused, or in flight
            raise _refusal_problem(exc) from exc
        return Response(accepted.body, status=accepted.status, headers=accepted.headers)


def _batch_item(
    raw: dict[str, Any], validator: LinkCreateInputSerializer
) -> services.LinkItem | services.BatchRefusal:
    """Validate one batch item as POST /link validates its header and body."""
    body = {name: value for name, value in raw.items() if name != "idempotency-key"}
    try:
        key = _idempotency_key(raw.get("idempotency-key"))
        request_data = validator.validate_another(body)
    except (Problem, ValidationError) as exc:
        return services.BatchRefusal(problem=problem_of(exc))
    return services.LinkItem(idempotency_key=key, body=body, request_data=request_data)


class LinkBatchStatusApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_batch_status",
        summary="Read a batch's progress",
        parameters=[_path_id("batch_id", "The `batch-id` returned by POST /link/batch.")],
        responses={
            (200, "application/json"): LinkBatchStatusSerializer,
            **problem_responses(401, 404, 503),
        },
    )
    def get(self, request: Request, batch_id: str) -> Response:
        data = link_batch_status(customer=request_customer(request), batch_id=batch_id)
        if data is None:
            raise Problem("not-found")
        return Response(data)


class LinkStatusApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_status",
        summary="Read a link request's status",
        parameters=[_path_id("workflow_id", "The `workflow-id` returned by POST /link.")],
        responses={
            (200, "application/json"): LinkStatusOutputSerializer,
            **problem_responses(401, 404, 503),
        },
    )
    def get(self, request: Request, workflow_id: str) -> Response:
        data = link_status_for_customer(customer=request_customer(request), workflow_id=workflow_id)
        if data is None:
            raise Problem("not-found")
        return Response(data)


class LinkDecisionApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_decide",
        summary="Decide a review: link one candidate, or reject them all",
        description="For a customer that decides its own reviews (`review_by=customer`): when a "
        "workflow enters REVIEW, the `link.review_required` webhook is sent and GET "
        "/link/status lists its `candidates`. Name one (`candidate-id`) to link it, or send "
        "`reject: true` to end the workflow with no match. The workflow then completes and "
        "`link.completed` is sent. Idempotent: the same decision again answers the same 200; "
        "another decision after one was taken is a 409.",
        parameters=[_path_id("workflow_id", "The `workflow-id` in REVIEW.")],
        request=LinkDecisionInputSerializer,
        responses={
            (200, "application/json"): LinkStatusOutputSerializer,
            **problem_responses(400, 401, 404, 409, 415, 422, 503),
        },
    )
    def post(self, request: Request, workflow_id: str) -> Response:
        customer = request_customer(request)
        serializer = LinkDecisionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            services.link_review_decide(
                customer=customer,
                workflow_id=workflow_id,
                candidate_id=data.get("candidate-id"),
                reason=data.get("reason", ""),
            )
        except services.ReviewNotFound as exc:
            raise Problem("not-found") from exc
        except services.DecisionConflict as exc:
            raise Problem("review-decided") from exc
        except services.ReviewByOperator as exc:
            raise Problem("review-by-operator") from exc
        except services.NotInReview as exc:
            raise Problem("not-in-review") from exc
        except services.UnknownCandidate as exc:
            raise Problem(
                "unknown-candidate",
                extra={"errors": [{"field": "candidate-id", "detail": "Not a candidate."}]},
            ) from exc
        status = link_status_for_customer(customer=customer, workflow_id=workflow_id)
        if status is None:  # deleted meanwhile (retention)
            raise Problem("not-found")
        return Response(status)


class PatientDetailApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="patient_read",
        summary="Read the details of a linked patient",
        description="The internal patient linked to this customer patient id, read from the "
        "internal system at call time (no cache). Every call is audited. Unknown, not linked and "
        "another customer's ids get the same 404.",
        parameters=[
            _path_id("patient_id", "The customer's own patient id (`patient.id` of POST /link).")
        ],
        responses={
            (200, "application/json"): PatientOutputSerializer,
            **problem_responses(401, 404, 503),
        },
    )
    def get(self, request: Request, patient_id: str) -> Response:
        try:
            details = services.patient_read(
                customer=request_customer(request), patient_id=patient_id
            )
        except services.PatientNotFound as exc:
            raise Problem("not-found") from exc
        except InternalSearchError as exc:
            raise Problem(
                "service-unavailable",
                "The internal patient index did not answer; retry later.",
                headers={"Retry-After": "5"},
            ) from exc
        return Response(details)


class LinkDeleteApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_delete",
        summary="De-link a customer patient",
        description="Sets the patient's link DE-LINKED and sends a `link.delinked` webhook. "
        "Idempotent: calling it again answers the same. A new POST /link for the patient is "
        "accepted afterwards.",
        parameters=[
            _path_id("patient_id", "The customer's own patient id."),
            OpenApiParameter(
                "reason",
                {"type": "string", "maxLength": 500, "pattern": NO_NUL_PATTERN},
                OpenApiParameter.QUERY,
                required=False,
                description="Why (kept in the link history; at most 500 characters).",
            ),
        ],
        responses={
            (200, "application/json"): DelinkOutputSerializer,
            **problem_responses(400, 401, 404, 503),
        },
    )
    def delete(self, request: Request, patient_id: str) -> Response:
        customer = request_customer(request)
        reason = request.query_params.get("reason", "")
        if len(reason) > 500:
            raise Problem("bad-request", "reason: at most 500 characters.")
        try:
            result = services.link_delink(
                customer=customer,
                patient_id=patient_id,
                actor=f"customer:{customer.id}",
                reason=reason,
            )
        except services.LinkNotFound as exc:
            raise Problem("not-found") from exc
        mapping = result.mapping
        return Response(
            {
                "patient-id": str(mapping.customer_patient_id),
                "status": mapping.status,
                "workflow-id": str(mapping.workflow_id),
                "delinked-at": mapping.delinked_at.isoformat().replace("+00:00", "Z")
                if mapping.delinked_at
                else None,
            }
        )


class SearchResultCallbackApi(APIView):
    """The internal system's result callback (contract section 2). Not a customer endpoint: it
    is authenticated by its Standard Webhooks signature, not by a customer token."""

    authentication_classes: list[type] = []
    permission_classes: list[type] = []
    throttle_classes: list[type] = []

    @extend_schema(
        operation_id="internal_search_result",
        summary="Receive an asynchronous search result (internal system only)",
        description="The FHIR searchset Bundle of the search job `search_id`, signed with the "
        "Standard Webhooks scheme and `INTERNAL_CALLBACK_SECRET` (headers `webhook-id`, "
        "`webhook-timestamp`, `webhook-signature`). A bad or missing signature gets 401 and "
        "changes nothing. A result for a workflow that has moved on (the sweep polled the job "
        "first) is acknowledged and ignored; an unknown search id gets 404, so the internal "
        "system retries it.",
        tags=["internal"],
        auth=[],
        request={"application/fhir+json": SearchsetBundleSerializer},
        parameters=[
            OpenApiParameter(
                "search_id",
                # The column's length; PostgreSQL stores no NUL.
                {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL_PATTERN},
                OpenApiParameter.PATH,
                description="The search job's id, as the internal system named it.",
            ),
            OpenApiParameter(
                "webhook-id",
                {"type": "string", "minLength": 1, "maxLength": 200},
                OpenApiParameter.HEADER,
                required=True,
            ),
            *(
                OpenApiParameter(name, str, OpenApiParameter.HEADER, required=True)
                for name in ("webhook-timestamp", "webhook-signature")
            ),
        ],
        responses={
            (200, "application/json"): SearchResultReceiptSerializer,
            **problem_responses(400, 401, 404, 413),
        },
    )
    def post(self, request: Request, search_id: str) -> Response:
        try:
            # At most DATA_UPLOAD_MAX_MEMORY_SIZE (128 KiB): five Patients fit many times over.
            body = request.body
        except RequestDataTooBig as exc:
            raise Problem("payload-too-large") from exc
        _verify_callback_signature(body, request.headers)
        webhook_id = request.headers["webhook-id"]
        if len(webhook_id) > 200:
            raise Problem("bad-request", "webhook-id is longer than 200 characters.")
        try:
            # Limits of their own: a searchset of full Patient resources nests deeper and has
            # more members than a link request, but not without bound (no RecursionError).
            document = json_loads_limited(
                body.decode("utf-8"), max_depth=CALLBACK_JSON_MAX_DEPTH, max_items=20_000
            )
            candidates = parse_bundle(document)
        except ValueError as exc:  # also JSONDecodeError, UnicodeDecodeError, JSONTooComplex
            raise Problem("bad-request", f"not a searchset Bundle: {exc}") from exc
        try:
            receipt = services.link_search_result(
                search_id=search_id,
                candidates=candidates,
                webhook_id=webhook_id,
            )
        except services.CallbackReplayed as exc:
            raise Problem("unauthorized", "This webhook-id was used for another search.") from exc
        except services.SearchUnknown as exc:
            raise Problem("not-found", "No workflow waits for this search id.") from exc
        return Response(SearchResultReceiptSerializer(receipt).data)


def _verify_callback_signature(body: bytes, headers: Mapping[str, str]) -> None:
    secret = settings.INTERNAL_CALLBACK_SECRET
    try:
        Webhook(secret).verify(body, dict(headers), json_parse=False)
    except EmptyWebhookSecretError as exc:
        raise Problem("unauthorized", "Search callbacks are not enabled.") from exc
    except (WebhookVerificationError, ValueError) as exc:
        # ValueError: a body that is not UTF-8, a signature that is not `v1,<base64>`.
        raise Problem("unauthorized", "Bad or missing webhook signature.") from exc


class LinksListApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="links_list",
        summary="List the customer's links, newest change first",
        description="The customer's patient links (LINKED and DE-LINKED mappings), newest "
        "`updated-at` first, a page at a time. Pages are keyset-paginated: pass `next-cursor` "
        "as `cursor`, with the same `status` and `updated-since`, for the next page; links "
        "made or changed meanwhile sort before the cursor, so later pages neither repeat nor "
        "skip one (they are seen by listing again, e.g. with `updated-since`). A cursor does "
        "not expire. Unknown or repeated query parameters, a cursor that was not given to this "
        "customer or was given with other filters, and a time without a time zone are a 400 "
        "`validation-error` naming the parameter.",
        parameters=[
            OpenApiParameter(
                "status",
                str,
                OpenApiParameter.QUERY,
                enum=["LINKED", "DE-LINKED"],
                description="Only links in this status (both when absent).",
            ),
            OpenApiParameter(
                "updated-since",
                OpenApiTypes.DATETIME,
                OpenApiParameter.QUERY,
                description="Only links whose `updated-at` is at or after this time (RFC 3339, "
                "with `Z` or an offset).",
            ),
            OpenApiParameter(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": LINKS_LIMIT_MAX,
                    "default": LINKS_LIMIT_DEFAULT,
                },
                OpenApiParameter.QUERY,
                description=f"Links per page, 1-{LINKS_LIMIT_MAX} ({LINKS_LIMIT_DEFAULT} by "
                "default).",
            ),
            OpenApiParameter(
                "cursor",
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": LINKS_CURSOR_MAX_LENGTH,
                    "pattern": LINKS_CURSOR_PATTERN,
                },
                OpenApiParameter.QUERY,
                description="The `next-cursor` of the previous page (opaque).",
            ),
        ],
        responses={
            (200, "application/json"): LinksListOutputSerializer,
            **problem_responses(400, 401, 503),
        },
    )
    def get(self, request: Request) -> Response:
        customer = request_customer(request)
        query = LinksListQuerySerializer(data=request.query_params, context={"customer": customer})
        query.is_valid(raise_exception=True)
        return Response(links_page(customer=customer, **query.validated_data))
