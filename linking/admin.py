from django.contrib import admin
from django.http import HttpRequest

from linking.models import IdempotencyRecord


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
