from django.contrib import admin
from django.db import models

from merchant.models import Customer


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin[Customer]):
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
