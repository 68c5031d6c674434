"""Link use cases: accepting a request (the ack path) and processing it (the consumer)."""

from linking.services.accept import (
    IN_FLIGHT_RETRY_AFTER_SECONDS,
    STATUS_RETRY_AFTER_SECONDS,
    IdempotencyKeyReused,
    InsufficientDemographics,
    LinkAcceptance,
    LinkInProgress,
    LinkRefused,
    PatientAlreadyLinked,
    RequestInFlight,
    idempotency_purge_expired,
    link_accept,
    request_fingerprint,
)
from linking.services.links import Delinked, LinkNotFound, link_delink, link_history_record
from linking.services.patients import PatientNotFound, patient_details, patient_read
from linking.services.process import (
    ProcessOutcome,
    Retry,
    link_process,
    links_process,
    retry_backoff,
)
from linking.services.retention import (
    RotationReport,
    request_data_purge_expired,
    request_data_rotate_key,
)
from linking.services.review import ReviewError, link_review_resolve
from linking.services.search_results import (
    CallbackReplayed,
    SearchResultReceipt,
    SearchUnknown,
    link_search_result,
    search_callbacks_purge,
)

__all__ = [
    "IN_FLIGHT_RETRY_AFTER_SECONDS",
    "STATUS_RETRY_AFTER_SECONDS",
    "CallbackReplayed",
    "Delinked",
    "IdempotencyKeyReused",
    "InsufficientDemographics",
    "LinkAcceptance",
    "LinkInProgress",
    "LinkNotFound",
    "LinkRefused",
    "PatientAlreadyLinked",
    "PatientNotFound",
    "ProcessOutcome",
    "RequestInFlight",
    "Retry",
    "ReviewError",
    "RotationReport",
    "SearchResultReceipt",
    "SearchUnknown",
    "idempotency_purge_expired",
    "link_accept",
    "link_delink",
    "link_history_record",
    "link_process",
    "link_review_resolve",
    "link_search_result",
    "links_process",
    "patient_details",
    "patient_read",
    "request_data_purge_expired",
    "request_data_rotate_key",
    "request_fingerprint",
    "retry_backoff",
    "search_callbacks_purge",
]
