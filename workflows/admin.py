import datetime as dt
from collections.abc import Callable
from typing import Any

from django import forms
from django.apps import apps
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import URLPattern, path
from django.utils import timezone

from workflows.models import (
    PENDING_STATES,
    WebhookAttempt,
    WebhookDelivery,
    Workflow,
    WorkflowTransition,
)
from workflows.scheduler import schedule_summary
from workflows.selectors import ops_dashboard
from workflows.services import webhook_redeliver, workflow_mark_failed, workflow_requeue


class WorkflowTransitionInline(admin.TabularInline[WorkflowTransition, Workflow]):
    model = WorkflowTransition
    fields = ("at", "source", "target", "actor", "reason")
    readonly_fields = ("at", "source", "target", "actor", "reason")
    extra = 0
    can_delete = False
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the timeline is append-only, written by the services


class StuckFilter(admin.SimpleListFilter):
    """Pending for longer than the reconciliation threshold."""

    title = "stuck"
    parameter_name = "stuck"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", f"pending > {settings.RECONCILE_STALE_AFTER_SECONDS} s")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() != "yes":
            return queryset
        cutoff = timezone.now() - dt.timedelta(seconds=settings.RECONCILE_STALE_AFTER_SECONDS)
        return queryset.filter(status__in=PENDING_STATES, updated_at__lt=cutoff)


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.TextInput(attrs={"size": 60}))


def admin_actor(request: HttpRequest) -> str:
    return f"operator:{request.user.get_username()}"


def action_with_reason(
    model_admin: admin.ModelAdmin[Any],
    request: HttpRequest,
    queryset: QuerySet[Any],
    *,
    action: str,
    title: str,
    explanation: str,
    apply: Callable[[Any, str], None],
    done: str,
) -> HttpResponse | None:
    """An admin action that first asks for a reason (kept in the timeline or history)."""
    form = ReasonForm(request.POST if "apply" in request.POST else None)
    if "apply" in request.POST and form.is_valid():
        objects = list(queryset)
        for obj in objects:
            apply(obj, form.cleaned_data["reason"])
        model_admin.message_user(request, done.format(n=len(objects)), messages.SUCCESS)
        return None
    return render(
        request,
        "admin/action_with_reason.html",
        {
            **model_admin.admin_site.each_context(request),
            "title": title,
            "explanation": explanation,
            "objects": queryset,
            "form": form,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "opts": model_admin.model._meta,
        },
    )


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin[Workflow]):
    list_display = [
        "id",
        "customer",
        "status",
        "result",
        "attempts",
        "requeues",
        "created_at",
        "updated_at",
    ]
    list_filter = [StuckFilter, "status", "customer", "request_type"]
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
        "requeues",
        "claim_id",
        "claimed_until",
        "webhook_url",
        "search_id",
        "created_at",
        "updated_at",
    ]
    inlines = [WorkflowTransitionInline]
    actions = ["requeue", "mark_failed", "redeliver_webhooks"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="workflows_workflow_dashboard",
        )
        return [dashboard, *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """The ops console's first page: every list links to the workflows (their timelines)
        and to the filtered changelists where the actions (re-queue, mark FAILED, redeliver,
        review) are."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Operations dashboard",
            "opts": self.model._meta,
            "review_admin": self._review_admin(),
            **ops_dashboard(),
            "schedule": schedule_summary(),
        }
        return render(request, "admin/workflows/dashboard.html", context)

    def _review_admin(self) -> str:
        """The URL-name prefix of the admin pages where a person decides REVIEW workflows: those
        of the proxy of Workflow that the deciding app registers (linking.LinkReview), looked
        up in this admin site rather than named, since this app sits below that one; this
        model's own pages when there is none."""
        for model in apps.get_models():
            if (
                model._meta.proxy
                and model._meta.concrete_model is Workflow
                and self.admin_site.is_registered(model)
            ):
                return f"admin:{model._meta.app_label}_{model._meta.model_name}"
        return f"admin:{self.opts.app_label}_{self.opts.model_name}"

    @admin.action(description="Re-queue (FAILED -> RECEIVED; pending: due at once)")
    def requeue(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        done = 0
        for workflow_id in queryset.values_list("id", flat=True):
            try:
                workflow_requeue(workflow_id=workflow_id, actor=admin_actor(request))
                done += 1
            except ValueError as exc:
                self.message_user(request, str(exc), messages.WARNING)
        self.message_user(request, f"Re-queued {done} workflow(s).", messages.SUCCESS)

    @admin.action(description="Mark FAILED with a reason (the customer is told)")
    def mark_failed(
        self, request: HttpRequest, queryset: QuerySet[Workflow]
    ) -> HttpResponse | None:
        def fail(workflow: Workflow, reason: str) -> None:
            workflow_mark_failed(workflow_id=workflow.id, actor=admin_actor(request), reason=reason)

        return action_with_reason(
            self,
            request,
            queryset.filter(status__in=PENDING_STATES),
            action="mark_failed",
            title="Mark workflows FAILED",
            explanation="These pending workflows will be marked FAILED and each customer gets a "
            "link.failed webhook with the reason.",
            apply=fail,
            done="Marked {n} workflow(s) FAILED.",
        )

    @admin.action(description="Redeliver webhooks")
    def redeliver_webhooks(self, request: HttpRequest, queryset: QuerySet[Workflow]) -> None:
        count = webhook_redeliver(workflow_ids=list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"Re-queued {count} webhook delivery(ies).", messages.SUCCESS)


class WebhookAttemptInline(admin.TabularInline[WebhookAttempt, WebhookDelivery]):
    model = WebhookAttempt
    fields = ("at", "status_code", "latency_ms", "error")
    readonly_fields = ("at", "status_code", "latency_ms", "error")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin[WebhookDelivery]):
    list_display = [
        "webhook_id",
        "customer",
        "event_type",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
    ]
    list_filter = ["status", "event_type", "customer"]
    search_fields = ["webhook_id", "workflow__id"]
    list_select_related = ["customer"]
    readonly_fields = [
        "webhook_id",
        "workflow",
        "customer",
        "event_type",
        "url",
        "payload",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status_code",
        "last_error",
        "created_at",
        "updated_at",
        "delivered_at",
    ]
    inlines = [WebhookAttemptInline]
    actions = ["redeliver"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Redeliver (same webhook-id, schedule restarts)")
    def redeliver(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        workflow_ids = list(queryset.values_list("workflow_id", flat=True))
        count = webhook_redeliver(workflow_ids=workflow_ids)
        self.message_user(request, f"Re-queued {count} delivery(ies).", messages.SUCCESS)


# The admin's home page starts with a link to the ops console's dashboard.
admin.site.index_template = "admin/workflows/index.html"
