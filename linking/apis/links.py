"""POST /link, GET /link/status, the customer's decision and DELETE /link."""

from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from linking import services
from linking.apis.common import (
    ACCEPTED_HEADERS,
    IDEMPOTENCY_KEY_HEADER,
    NO_NUL_PATTERN,
    idempotency_key_checked,
    path_id,
    refusal_problem,
)
from linking.metrics import AckMeteredApi
from linking.selectors import (
    link_status_for_customer,
)
from linking.serializers.links import (
    DelinkOutputSerializer,
    LinkAcceptedSerializer,
    LinkCreateInputSerializer,
    LinkDecisionInputSerializer,
    LinkStatusOutputSerializer,
)
from merchant.auth import request_customer
from merchant.problems import Problem
from merchant.schema import problem_responses


class LinkCreateApi(AckMeteredApi):  # counts and times every answer (linking/metrics.py)
    throttle_scope = "link-create"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_create",
        summary="Ask for a customer patient to be linked",
        parameters=[IDEMPOTENCY_KEY_HEADER, *ACCEPTED_HEADERS],
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
        key = idempotency_key_checked(request.headers.get("idempotency-key"))
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
            raise refusal_problem(exc) from exc
        return Response(accepted.body, status=accepted.status, headers=accepted.headers)


class LinkStatusApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_status",
        summary="Read a link request's status",
        parameters=[path_id("workflow_id", "The `workflow-id` returned by POST /link.")],
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
        parameters=[path_id("workflow_id", "The `workflow-id` in REVIEW.")],
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


class LinkDeleteApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="link_delete",
        summary="De-link a customer patient",
        description="Sets the patient's link DE-LINKED and sends a `link.delinked` webhook. "
        "Idempotent: calling it again answers the same. A new POST /link for the patient is "
        "accepted afterwards.",
        parameters=[
            path_id("patient_id", "The customer's own patient id."),
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
