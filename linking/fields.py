"""An encrypted JSON document field for the request data (docs/operations.md, "Request data
at rest").

The keys are django-fernet-encrypted-fields' own: Fernet keys derived (PBKDF2-SHA256) from
SECRET_KEY (then SECRET_KEY_FALLBACKS) with each SALT_KEY (settings.REQUEST_DATA_KEYS); the first
pair encrypts, every pair decrypts, so a new key can be put in front without downtime.

The library's own EncryptedJSONField is not used as it is: it encrypts each leaf value on its
own and leaves the object's keys in clear (free-form `insurance` keys are the customer's data),
shows the document's shape, and gives every leaf back as a string (20 -> "20", null -> "None").
Here the whole document is one Fernet token in a text column.
"""

import json
import weakref
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.expressions import Expression
from django.dispatch import receiver
from encrypted_fields.fields import EncryptedFieldMixin  # type: ignore[import-untyped]

# Fernet tokens are url-safe base64 of a version byte 0x80 and a timestamp: they begin so.
FERNET_PREFIX = "gAAAAA"
KEY_SETTINGS = frozenset({"SECRET_KEY", "SECRET_KEY_FALLBACKS", "SALT_KEY"})

_instances: "weakref.WeakSet[EncryptedJSONDocumentField]" = weakref.WeakSet()


class RequestDataUnreadable(ImproperlyConfigured):
    """A stored token that none of the configured keys decrypts (a key was dropped too soon)."""


class EncryptedJSONDocumentField(EncryptedFieldMixin, models.TextField):
    """A JSON document stored as one Fernet token (text). Not searchable, by design."""

    # For django-stubs: the model attribute is the decoded JSON, as with models.JSONField.
    _pyi_private_set_type: Any
    _pyi_private_get_type: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _instances.add(self)

    @property
    def primary(self) -> Fernet:
        """The key new tokens are made with (SECRET_KEY with the first REQUEST_DATA_KEYS)."""
        return Fernet(self.keys[0])

    @property
    def keyring(self) -> MultiFernet:
        """Every configured key, first key first (`rotate` re-encrypts with the first)."""
        return MultiFernet([Fernet(key) for key in self.keys])

    def encrypt_text(self, text: str) -> str:
        token: bytes = self.f.encrypt(text.encode("utf-8"))
        return token.decode("ascii")

    def decrypt_text(self, token: str) -> str:
        try:
            text: bytes = self.f.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError) as exc:
            raise RequestDataUnreadable(
                "request data cannot be decrypted with SECRET_KEY (and its fallbacks) and "
                "REQUEST_DATA_KEYS: was a key dropped before rotate_request_data_key ran?"
            ) from exc
        return text.decode("utf-8")

    def get_prep_value(self, value: Any) -> Any:
        if value is None:
            return None
        return self.encrypt_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def from_db_value(
        self, value: Any, expression: Expression | None, connection: BaseDatabaseWrapper
    ) -> Any:
        if value is None:
            return None
        if not value.startswith(FERNET_PREFIX):
            # A row written in clear, by the code before the encryption or by an old instance
            # during the deploy: readable, and encrypted by rotate_request_data_key.
            return json.loads(value)
        return json.loads(self.decrypt_text(value))

    def to_python(self, value: Any) -> Any:
        # Deserialisation (loaddata) and forms hand JSON text; the database path is from_db_value.
        if isinstance(value, str):
            return json.loads(value)
        return value

    def value_to_string(self, obj: models.Model) -> str:
        return json.dumps(self.value_from_object(obj), ensure_ascii=False)


@receiver(setting_changed)
def _forget_keys(*, setting: str, **kwargs: Any) -> None:
    """The library caches the derived keys per field; a test that changes a key setting needs
    them derived again (the same hook Django uses for its own cached settings)."""
    if setting in KEY_SETTINGS:
        for field in list(_instances):
            field.__dict__.pop("keys", None)
            field.__dict__.pop("f", None)
