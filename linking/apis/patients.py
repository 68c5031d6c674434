"""GET /patient/<patient-id>: the linked patient's details from the internal system."""

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from linking import services
from linking.apis.common import (
    path_id,
)
from linking.internal_search import InternalSearchError
from linking.serializers.patients import PatientOutputSerializer
from merchant.auth import request_customer
from merchant.problems import Problem
from merchant.schema import problem_responses


class PatientDetailApi(APIView):
    throttle_scope = "read"  # merchant/throttling.py

    @extend_schema(
        operation_id="patient_read",
        summary="Read the details of a linked patient",
        description="The internal patient linked to this customer patient id, read from the "
        "internal system at call time (no cache). Every call is audited. Unknown, not linked and "
        "another customer's ids get the same 404.",
        parameters=[
            path_id("patient_id", "The customer's own patient id (`patient.id` of POST /link).")
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
