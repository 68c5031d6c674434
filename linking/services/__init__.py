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
from linking.services.process import ProcessOutcome, link_process, retry_backoff

__all__ = [
    "IN_FLIGHT_RETRY_AFTER_SECONDS",
    "STATUS_RETRY_AFTER_SECONDS",
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
    "idempotency_purge_expired",
    "link_accept",
    "link_delink",
    "link_history_record",
    "link_process",
    "patient_details",
    "patient_read",
    "request_fingerprint",
    "retry_backoff",
]
