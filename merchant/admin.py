from django import forms
from django.contrib import admin
from django.db import models

from merchant.models import Customer
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
        "token_version",
        "created_at",
    ]
    list_filter = ["is_active", "webhook_enabled"]
    # Webhook URLs are https unless a local setting says otherwise.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    search_fields = ["name", "id"]
    readonly_fields = ["id", "webhook_secret", "token_version", "created_at", "updated_at"]
    fields = [
        "id",
        "name",
        "is_active",
        "webhook_url",
        "webhook_secret",
        "token_version",
        "auto_link_score",
        "auto_link_margin",
        "review_min_score",
        "created_at",
        "updated_at",
    ]
