from django.apps import AppConfig


class LinkingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "linking"

    def ready(self) -> None:
        # The scheduler probes the internal system through the client that knows it (the
        # workflows app never imports this one).
        from linking.internal_search import internal_search_probe
        from workflows.scheduler import probe_register

        probe_register(internal_search_probe)
