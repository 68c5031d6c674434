from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse

from linking.models import (
    AuditEvent,
    IdempotencyRecord,
    LinkHistory,
    LinkReview,
    MappingStatus,
    PatientMapping,
)
from linking.services import ReviewError, link_delink, link_review_resolve
from linking.services.review import review_case_read
from workflows.admin import action_with_reason, admin_actor
from workflows.models import Status

REJECT = "reject"


class ReviewForm(forms.Form):
    decision = forms.ChoiceField(widget=forms.RadioSelect)
    reason = forms.CharField(max_length=500, widget=forms.TextInput(attrs={"size": 60}))

    def __init__(self, *args: Any, candidate_ids: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        decision = self.fields["decision"]
        assert isinstance(decision, forms.ChoiceField)
        choices = [(i, f"Link {i}") for i in candidate_ids]
        decision.choices = [*choices, (REJECT, "None of them: no match")]


@admin.register(LinkReview)
class LinkReviewAdmin(admin.ModelAdmin[LinkReview]):
    """Workflows waiting for an operator: the candidates side by side with what the customer
    sent; the decision (link one, or reject) is final and the customer is told then."""

    list_display = ["id", "customer", "patient_id", "reason", "candidate_count", "updated_at"]
    list_filter = ["customer"]
    search_fields = ["id", "patient_id"]
    list_select_related = ["customer"]
    ordering = ["updated_at"]  # the longest waiting first

    def get_queryset(self, request: HttpRequest) -> QuerySet[LinkReview]:
        return (
            super()
            .get_queryset(request)
            .filter(status=Status.REVIEW)
            .annotate(candidate_count=Count("candidates"))
        )

    @admin.display(description="candidates", ordering="candidate_count")
    def candidate_count(self, obj: Any) -> int:
        return int(obj.candidate_count)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        workflow = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not self.has_change_permission(request, workflow):
            return HttpResponse(status=403)
        case = review_case_read(workflow=workflow, actor=admin_actor(request))
        candidate_ids = [c.candidate.internal_patient_id for c in case.candidates]
        form = ReviewForm(
            request.POST if request.method == "POST" else None, candidate_ids=candidate_ids
        )
        if request.method == "POST" and form.is_valid():
            decision = form.cleaned_data["decision"]
            try:
                link_review_resolve(
                    workflow_id=workflow.id,
                    internal_patient_id=None if decision == REJECT else decision,
                    actor=admin_actor(request),
                    reason=form.cleaned_data["reason"],
                )
            except ReviewError as exc:
                form.add_error(None, str(exc))
            else:
                done = "rejected" if decision == REJECT else f"linked to {decision}"
                self.message_user(request, f"Review {workflow.id}: {done}.", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:linking_linkreview_changelist"))
        return render(
            request,
            "admin/linking/linkreview/resolve.html",
            {
                **self.admin_site.each_context(request),
                "title": f"Review {workflow.id}",
                "case": case,
                "form": form,
                "opts": self.model._meta,
            },
        )


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
