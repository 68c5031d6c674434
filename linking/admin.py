from django.contrib import admin
from django.http import HttpRequest

from linking.models import AuditEvent, IdempotencyRecord, PatientMapping


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
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
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
