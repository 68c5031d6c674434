"""Link use cases: accepting a request (the ack path) and processing it (the consumer)."""

from linking.services.accept import (
    IN_FLIGHT_RETRY_AFTER_SECONDS,
    STATUS_RETRY_AFTER_SECONDS,
    IdempotencyKeyReused,
    InsufficientDemographics,
    LinkAcceptance,
    LinkInProgress,
    LinkItem,
    LinkRefused,
    PatientAlreadyLinked,
    RequestInFlight,
    idempotency_purge_expired,
    link_accept,
    request_fingerprint,
)
from linking.services.batch import BatchRefusal, link_accept_batch, link_batches_purge_expired
from linking.services.links import Delinked, LinkNotFound, link_delink, link_history_record
from linking.services.patients import PatientNotFound, patient_details, patient_read
from linking.services.process import (
    ProcessOutcome,
    link_process,
    links_process,
)
from linking.services.retention import (
    RotationReport,
    request_data_purge_expired,
    request_data_rotate_key,
)
from linking.services.review import (
    DecisionConflict,
    NotInReview,
    ReviewByOperator,
    ReviewError,
    ReviewNotFound,
    UnknownCandidate,
    link_review_decide,
    link_review_resolve,
)
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
    "BatchRefusal",
    "CallbackReplayed",
    "DecisionConflict",
    "Delinked",
    "IdempotencyKeyReused",
    "InsufficientDemographics",
    "LinkAcceptance",
    "LinkInProgress",
    "LinkItem",
    "LinkNotFound",
    "LinkRefused",
    "NotInReview",
    "PatientAlreadyLinked",
    "PatientNotFound",
    "ProcessOutcome",
    "RequestInFlight",
    "ReviewByOperator",
    "ReviewError",
    "ReviewNotFound",
    "RotationReport",
    "SearchResultReceipt",
    "SearchUnknown",
    "UnknownCandidate",
    "idempotency_purge_expired",
    "link_accept",
    "link_accept_batch",
    "link_batches_purge_expired",
    "link_delink",
    "link_history_record",
    "link_process",
    "link_review_decide",
    "link_review_resolve",
    "link_search_result",
    "links_process",
    "patient_details",
    "patient_read",
    "request_data_purge_expired",
    "request_data_rotate_key",
    "request_fingerprint",
    "search_callbacks_purge",
]
