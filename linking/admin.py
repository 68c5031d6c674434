from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from linking.models import (
    AuditEvent,
    IdempotencyRecord,
    LinkHistory,
    MappingStatus,
    PatientMapping,
)
from linking.services import link_delink
from workflows.admin import action_with_reason, admin_actor


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin[IdempotencyRecord]):
    list_display = ["key", "customer", "workflow", "response_status", "created_at", "expires_at"]
    list_filter = ["customer"]
    search_fields = ["key", "workflow__id"]
    readonly_fields = [
        "customer",
        "key",
        "fingerprint",
        "workflow",
        "response_status",
        "response_body",
        "response_headers",
        "created_at",
        "expires_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(PatientMapping)
class PatientMappingAdmin(admin.ModelAdmin[PatientMapping]):
    list_display = [
        "customer_patient_id",
        "internal_patient_id",
        "customer",
        "status",
        "score",
        "match_grade",
        "workflow",
        "created_at",
    ]
    list_filter = ["status", "match_grade", "customer"]
    search_fields = ["customer_patient_id", "internal_patient_id", "workflow__id"]
    list_select_related = ["customer"]
    readonly_fields = [
        "customer",
        "customer_patient_id",
        "internal_patient_id",
        "status",
        "workflow",
        "score",
        "match_grade",
        "created_at",
        "updated_at",
        "delinked_at",
        "delinked_by",
        "delinked_reason",
    ]
    actions = ["delink"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="De-link (the customer is told)")
    def delink(
        self, request: HttpRequest, queryset: QuerySet[PatientMapping]
    ) -> HttpResponse | None:
        def apply(mapping: PatientMapping, reason: str) -> None:
            link_delink(
                customer=mapping.customer,
                patient_id=str(mapping.customer_patient_id),
                actor=admin_actor(request),
                reason=reason,
            )

        return action_with_reason(
            self,
            request,
            queryset.filter(status=MappingStatus.LINKED).select_related("customer"),
            action="delink",
            title="De-link patients",
            explanation="These links will be set DE-LINKED and each customer gets a "
            "link.delinked webhook with the reason.",
            apply=apply,
            done="De-linked {n} patient(s).",
        )


@admin.register(LinkHistory)
class LinkHistoryAdmin(admin.ModelAdmin[LinkHistory]):
    list_display = ["at", "customer_patient_id", "event", "internal_patient_id", "actor"]
    list_filter = ["event", "customer"]
    search_fields = ["customer_patient_id", "internal_patient_id", "workflow__id"]
    readonly_fields = [
        "at",
        "customer",
        "customer_patient_id",
        "event",
        "mapping",
        "workflow",
        "internal_patient_id",
        "score",
        "actor",
        "reason",
    ]

    # Append-only, like the audit log.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LinkHistory | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: LinkHistory | None = None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin[AuditEvent]):
    list_display = ["at", "actor", "action", "subject", "outcome", "customer"]
    list_filter = ["action", "outcome", "customer"]
    search_fields = ["subject", "actor"]
    date_hierarchy = "at"
    readonly_fields = ["at", "actor", "action", "customer", "subject", "outcome"]

    # Append-only: written by the services, never edited or removed here.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
