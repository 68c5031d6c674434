from django.contrib import admin
from django.http import HttpRequest

from workflows.models import Workflow, WorkflowTransition


class WorkflowTransitionInline(admin.TabularInline[WorkflowTransition, Workflow]):
    model = WorkflowTransition
    fields = ("at", "source", "target", "actor", "reason")
    readonly_fields = ("at", "source", "target", "actor", "reason")
    extra = 0
    can_delete = False
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Workflow | None = None) -> bool:
        return False  # the timeline is append-only, written by the services


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin[Workflow]):
    list_display = [
        "id",
        "customer",
        "status",
        "result",
        "attempts",
        "created_at",
        "updated_at",
    ]
    list_filter = ["status", "customer", "request_type"]
    search_fields = ["id", "request_id", "patient_id"]
    list_select_related = ["customer"]
    date_hierarchy = "created_at"
    # The status moves only through the state machine's services, never by hand.
    readonly_fields = [
        "id",
        "request_id",
        "customer",
        "patient_id",
        "request_type",
        "status",
        "result",
        "reason",
        "attempts",
        "search_id",
        "created_at",
        "updated_at",
    ]
    inlines = [WorkflowTransitionInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Workflow | None = None) -> bool:
        return False
