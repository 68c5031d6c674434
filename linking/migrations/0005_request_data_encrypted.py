"""Request data encrypted at rest: the jsonb column becomes text holding one Fernet token.

One transaction: the ALTER takes the table's lock, so no request is accepted half-way through and
no row is left in clear. Rows written in clear afterwards by an instance still running the old
code (a rolling deploy) stay readable; `manage.py rotate_request_data_key` encrypts them.
Reversible: going back decrypts every row into jsonb again.
"""

from typing import Any

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

import linking.fields

BATCH = 500
TABLE = "linking_linkrequest"


def _rows(schema_editor: BaseDatabaseSchemaEditor, where: str) -> Any:
    """(request_id, data) in batches, keyset-paged on the primary key."""
    last = None
    with schema_editor.connection.cursor() as cursor:
        while True:
            after = "" if last is None else "AND request_id > %s"
            cursor.execute(
                f"SELECT request_id, data FROM {TABLE} WHERE {where} {after} "  # noqa: S608
                f"ORDER BY request_id LIMIT {BATCH}",
                [] if last is None else [last],
            )
            batch = cursor.fetchall()
            if not batch:
                return
            yield batch
            last = batch[-1][0]


def _field(apps: StateApps) -> linking.fields.EncryptedJSONDocumentField:
    field = apps.get_model("linking", "LinkRequest")._meta.get_field("data")
    assert isinstance(field, linking.fields.EncryptedJSONDocumentField)
    return field


def encrypt_rows(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    field = _field(apps)
    prefix = linking.fields.FERNET_PREFIX
    with schema_editor.connection.cursor() as cursor:
        for batch in _rows(schema_editor, f"data NOT LIKE '{prefix}%%'"):
            cursor.executemany(
                f"UPDATE {TABLE} SET data = %s WHERE request_id = %s",  # noqa: S608
                [(field.encrypt_text(text), request_id) for request_id, text in batch],
            )


def decrypt_rows(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    field = _field(apps)
    prefix = linking.fields.FERNET_PREFIX
    with schema_editor.connection.cursor() as cursor:
        for batch in _rows(schema_editor, f"data LIKE '{prefix}%%'"):
            cursor.executemany(
                f"UPDATE {TABLE} SET data = %s WHERE request_id = %s",  # noqa: S608
                [(field.decrypt_text(token), request_id) for request_id, token in batch],
            )


class Migration(migrations.Migration):
    dependencies = [
        ("linking", "0004_search_callbacks"),
    ]

    operations = [
        # PostgreSQL: ALTER COLUMN data TYPE text USING data::text (and back with ::jsonb).
        migrations.AlterField(
            model_name="linkrequest",
            name="data",
            field=linking.fields.EncryptedJSONDocumentField(),
        ),
        migrations.RunPython(encrypt_rows, decrypt_rows),
    ]
