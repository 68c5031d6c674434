from django.db import models
from django.db.models import Q
from django.utils import timezone

from linking.fields import EncryptedJSONDocumentField
from workflows.models import Workflow


class LinkRequest(models.Model):
    """The request data of seed section 2.3.2 (request-id -> customer and patient details).

    Kept in PostgreSQL, written in the same transaction as the workflow, because Redis may lose
    it; this is the only table that holds demographics.
    """

    request_id = models.UUIDField(primary_key=True, editable=False)
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.PROTECT, related_name="link_requests"
    )
    # Encrypted at rest (REQUEST_DATA_KEYS); deleted REQUEST_DATA_RETENTION_DAYS after the
    # workflow ended (linking/services/retention.py).
    data = EncryptedJSONDocumentField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return str(self.request_id)


class IdempotencyRecord(models.Model):
    """The first response given for (customer, Idempotency-Key), replayed on a retry."""

    # Indexed by idempotency_customer_key, which starts with it.
    customer = models.ForeignKey(
        "merchant.Customer",
        on_delete=models.CASCADE,
        related_name="idempotency_records",
        db_index=False,
    )
    key = models.CharField(max_length=255)
    # SHA-256 of the canonical JSON body: the same key with another body is refused (422).
    fingerprint = models.CharField(max_length=64)
    workflow = models.ForeignKey(
        "workflows.Workflow", on_delete=models.CASCADE, related_name="idempotency_records"
    )
    response_status = models.PositiveSmallIntegerField()
    # Text, not jsonb: a replay must return the first body byte for byte (jsonb reorders keys).
    response_body = models.TextField()
    response_headers = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["customer", "key"], name="idempotency_customer_key"),
        ]

    def __str__(self) -> str:
        return f"{self.customer_id}:{self.key}"


class LinkBatch(models.Model):
    """One POST /link/batch: its answer (replayed for its Idempotency-Key) and, by its id, the
    items GET /link/batch/<id> reports on. Ids and problems only, never the request data."""

    id = models.UUIDField(primary_key=True, editable=False)
    # Indexed by link_batch_customer_key, which starts with it.
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.CASCADE, related_name="link_batches", db_index=False
    )
    # Null once the replay window has passed: the key is free again, the batch still readable.
    idempotency_key = models.CharField(max_length=255, null=True)
    fingerprint = models.CharField(max_length=64)
    # Text, as IdempotencyRecord's: the replay is the first answer as it was.
    response_body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["customer", "idempotency_key"], name="link_batch_customer_key"
            ),
        ]

    def __str__(self) -> str:
        return str(self.id)


class MappingStatus(models.TextChoices):
    LINKED = "LINKED"
    DELINKED = "DE-LINKED"


class PatientMapping(models.Model):
    """Customer patient id -> internal patient id (seed section 2.3.1, table patient-mapping)."""

    # Indexed by mapping_patient, which starts with it.
    customer = models.ForeignKey(
        "merchant.Customer",
        on_delete=models.PROTECT,
        related_name="patient_mappings",
        db_index=False,
    )
    customer_patient_id = models.UUIDField()
    internal_patient_id = models.CharField(max_length=64)
    status = models.CharField(
        max_length=16, choices=MappingStatus.choices, default=MappingStatus.LINKED
    )
    workflow = models.ForeignKey(
        "workflows.Workflow", on_delete=models.PROTECT, related_name="mappings"
    )
    score = models.FloatField(null=True, blank=True)
    match_grade = models.CharField(max_length=16, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    delinked_at = models.DateTimeField(null=True, blank=True)
    delinked_by = models.CharField(max_length=150, blank=True, default="")
    delinked_reason = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["customer", "customer_patient_id"],
                condition=Q(status=MappingStatus.LINKED),
                name="mapping_one_linked_per_patient",
            ),
            models.CheckConstraint(
                condition=Q(status__in=MappingStatus.values), name="mapping_status_valid"
            ),
        ]
        indexes = [
            # A patient's mappings whatever their status (link_record reads the linked and the
            # de-linked ones): without it PostgreSQL read every mapping of the customer.
            models.Index(fields=["customer", "customer_patient_id"], name="mapping_patient"),
            # GET /links' pages (keyset on updated_at, id): the page's rows, not the customer's.
            models.Index(fields=["customer", "-updated_at", "-id"], name="mapping_listing"),
        ]

    def __str__(self) -> str:
        return f"{self.customer_patient_id} -> {self.internal_patient_id} ({self.status})"


class AuditEvent(models.Model):
    """Append-only record of every read of patient data: who, what, when, with what outcome."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150)  # "customer:<id>" or "operator:<username>"
    action = models.CharField(max_length=64)  # e.g. "patient.read"
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.PROTECT, related_name="audit_events"
    )
    subject = models.CharField(max_length=200)  # the customer's patient id as asked
    outcome = models.CharField(max_length=32)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["customer", "subject"], name="audit_customer_subject")]

    def __str__(self) -> str:
        return (
            f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.subject} {self.outcome}"
        )


class LinkEvent(models.TextChoices):
    LINKED = "linked"
    RELINKED = "relinked"  # linked again after a de-link
    DELINKED = "delinked"
    # An operator resolved a review by rejecting every candidate: the request ended NO_RESULTS.
    REVIEW_REJECTED = "review-rejected"


class LinkHistory(models.Model):
    """Append-only history of a customer patient's link: every change, who made it and why."""

    # Indexed by history_patient, which starts with it.
    customer = models.ForeignKey(
        "merchant.Customer", on_delete=models.PROTECT, related_name="link_history", db_index=False
    )
    customer_patient_id = models.UUIDField()
    event = models.CharField(max_length=16, choices=LinkEvent.choices)
    # None only for a rejected review, which made no mapping.
    mapping = models.ForeignKey(
        PatientMapping,
        on_delete=models.PROTECT,
        related_name="history",
        null=True,
        blank=True,
    )
    workflow = models.ForeignKey(
        "workflows.Workflow", on_delete=models.PROTECT, related_name="link_history"
    )
    internal_patient_id = models.CharField(max_length=64, blank=True)
    score = models.FloatField(null=True, blank=True)
    actor = models.CharField(max_length=150)  # "worker", "customer:<id>", "operator:<name>"
    reason = models.TextField(blank=True, default="")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]
        verbose_name_plural = "link history"
        indexes = [
            models.Index(fields=["customer", "customer_patient_id", "at"], name="history_patient")
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(event=LinkEvent.REVIEW_REJECTED) | Q(mapping__isnull=False),
                name="history_mapping_unless_rejected",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.customer_patient_id} {self.event}"


class SearchCandidate(models.Model):
    """One candidate of a workflow's internal search, as the internal system ranked it: what
    the decision was made on, and what an operator chooses from in a review."""

    workflow = models.ForeignKey(
        "workflows.Workflow", on_delete=models.CASCADE, related_name="candidates"
    )
    # The workflow attempt whose search this was: an operator's re-queue searches again.
    attempt = models.PositiveIntegerField()
    rank = models.PositiveSmallIntegerField()  # 1 = best
    internal_patient_id = models.CharField(max_length=64)
    score = models.FloatField()
    match_grade = models.CharField(max_length=16)
    # For a review: which fields the customer sent agree with this candidate's record,
    # {"family": true, "birth-date": false, ...} (linking.agreement); booleans, no demographics.
    agreement = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["workflow", "-attempt", "rank"]
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "attempt", "rank"], name="candidate_workflow_attempt_rank"
            ),
            models.CheckConstraint(
                condition=Q(score__gte=0, score__lte=1), name="candidate_score_in_unit_range"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.rank} {self.internal_patient_id} {self.score:.2f} {self.match_grade}"


class LinkReview(Workflow):
    """The admin's view of workflows waiting for an operator (status REVIEW)."""

    class Meta:
        proxy = True
        verbose_name = "link review"


class ReviewDecision(models.Model):
    """The decision that ended a review, one per workflow: a customer's repeat of the same
    decision is answered again, another one refused (POST /link/<workflow-id>/decision)."""

    workflow = models.OneToOneField(
        "workflows.Workflow", on_delete=models.CASCADE, related_name="review_decision"
    )
    # The candidate linked (its public candidate-id), or blank when every candidate was rejected.
    candidate_id = models.CharField(max_length=64, blank=True)
    actor = models.CharField(max_length=150)  # "customer:<id>" or "operator:<name>"
    decided_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.workflow_id}: {self.candidate_id or 'rejected'} by {self.actor}"


class SearchCallback(models.Model):
    """Each accepted search-result callback's `webhook-id`, bound to the search it was for.

    The signature covers the id, timestamp and body but not the URL: without this, a captured
    callback could be replayed, within the signature's 5-minute tolerance, to another search id.
    A `webhook-id` seen for one search is refused for any other (its retries stay welcome)."""

    webhook_id = models.CharField(max_length=200, unique=True)
    search_id = models.CharField(max_length=200)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.webhook_id} -> {self.search_id}"
