from django.apps import AppConfig


class MerchantConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "merchant"
    verbose_name = "Customers"

    def ready(self) -> None:
        from merchant import signals  # noqa: F401 -- connects the receivers
