import datetime as dt

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest

from merchant.models import Customer
from merchant.services import WEBHOOK_SECRET_OVERLAP_DEFAULT, customer_webhook_secret_rotate
from merchant.webhook_urls import WebhookURLError, webhook_url_check


class CustomerAdminForm(forms.ModelForm[Customer]):
    def clean_webhook_url(self) -> str:
        url: str = self.cleaned_data["webhook_url"]
        try:
            # The same rules as onboarding: the admin is a registration path too.
            return webhook_url_check(url=url, resolve=True)
        except WebhookURLError as exc:
            raise forms.ValidationError(str(exc)) from exc


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin[Customer]):
    form = CustomerAdminForm
    list_display = [
        "name",
        "id",
        "is_active",
        "webhook_url",
        "webhook_enabled",
        "review_by",
        "weight",
        "token_version",
        "created_at",
    ]
    list_filter = ["is_active", "webhook_enabled", "review_by"]
    # Webhook URLs are https unless a local setting says otherwise.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    search_fields = ["name", "id"]
    readonly_fields = [
        "id",
        "webhook_secret",
        "webhook_secret_previous_until",
        "token_version",
        "created_at",
        "updated_at",
    ]
    fields = [
        "id",
        "name",
        "is_active",
        "webhook_url",
        "webhook_secret",
        "webhook_secret_previous_until",
        "token_version",
        "auto_link_score",
        "auto_link_margin",
        "review_min_score",
        "review_by",
        "weight",
        "created_at",
        "updated_at",
    ]
    actions = ["rotate_webhook_secret"]

    @admin.action(
        description=(
            "Rotate the webhook secret (the old one keeps signing for "
            f"{WEBHOOK_SECRET_OVERLAP_DEFAULT / dt.timedelta(hours=1):g} h)"
        ),
        permissions=["change"],
    )
    def rotate_webhook_secret(self, request: HttpRequest, queryset: QuerySet[Customer]) -> None:
        for customer in queryset:
            secret = customer_webhook_secret_rotate(
                customer=customer,
                overlap=WEBHOOK_SECRET_OVERLAP_DEFAULT,
                actor=f"operator:{request.user.get_username()}",
            )
            until = customer.webhook_secret_previous_until
            self.message_user(
                request,
                f"New webhook secret of {customer}: {secret} (give it to the customer; the old "
                f"one keeps signing until {until:%Y-%m-%d %H:%M %Z}).",
                messages.WARNING,
            )
