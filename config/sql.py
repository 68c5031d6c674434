"""Rows written by hand-built statements, from the models' own metadata.

The hot paths (the ack, a worker's ending) write several rows in one statement (one round trip,
one transaction) with data-modifying CTEs, which the ORM cannot express. The columns, their
types and every value still come from the model and its fields, as save() would write them.
"""

import functools
from collections.abc import Mapping
from typing import Any

from django.db import connection
from django.db.models import Field, Model
from django.db.models.fields import AutoFieldMixin


def insert_select(
    instance: Model, *, name: str, computed: Mapping[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """`INSERT INTO <table> (<columns>) SELECT <values>` for an unsaved instance, and its
    parameters: each value a named parameter `<name>__<attname>`, prepared by its field as
    save() would (encryption included) and cast to its column's type (a bare parameter in a
    SELECT list would be text). `computed` gives an SQL expression instead for some attnames
    (a key an earlier CTE returned, say). Auto-incremented keys are left to the database.

    The caller appends what follows the SELECT list (`FROM`, `WHERE`, `RETURNING`)."""
    sql, fields = _insert_select_sql(type(instance), name, tuple(sorted((computed or {}).items())))
    params = {
        parameter: f.get_db_prep_save(f.pre_save(instance, True), connection)
        for parameter, f in fields
    }
    return sql, params


@functools.cache
def _insert_select_sql(
    model: type[Model], name: str, computed: tuple[tuple[str, str], ...]
) -> tuple[str, tuple[tuple[str, Field[Any, Any]], ...]]:
    # The same for every row of a model: built once per process, parameter names included (the
    # ack builds ~40 per request).
    expressions = dict(computed)
    meta = model._meta
    columns = tuple(f for f in meta.concrete_fields if not isinstance(f, AutoFieldMixin))
    unknown = set(expressions) - {f.attname for f in columns}
    if unknown:
        raise ValueError(f"{model.__name__} has no column {sorted(unknown)}")
    quote = connection.ops.quote_name
    values = ", ".join(
        expressions.get(f.attname) or f"CAST(%({name}__{f.attname})s AS {f.db_type(connection)})"
        for f in columns
    )
    parameters = tuple((f"{name}__{f.attname}", f) for f in columns if f.attname not in expressions)
    names = ", ".join(quote(f.column) for f in columns)
    return f"INSERT INTO {quote(meta.db_table)} ({names}) SELECT {values}", parameters


def update_guarded(
    instance: Model, *, name: str, guard: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """`UPDATE <table> SET <every column but the key> WHERE <key> AND <guard>`, and its
    parameters: save()'s update of a loaded instance, with each value prepared by its field,
    that touches the row only while the `guard` columns (attname -> value) still hold those
    values, as ConcurrentTransitionMixin guards a save on the status it loaded.

    The caller appends `RETURNING` to learn whether it did."""
    sql, fields, key, guarded = _update_guarded_sql(type(instance), name, tuple(sorted(guard)))
    params = {
        f"{name}__{f.attname}": f.get_db_prep_save(f.pre_save(instance, False), connection)
        for f in fields
    }
    params[f"{name}__{key.attname}"] = key.get_db_prep_save(instance.pk, connection)
    for field in guarded:
        params[f"{name}__guard__{field.attname}"] = field.get_db_prep_save(
            guard[field.attname], connection
        )
    return sql, params


@functools.cache
def _update_guarded_sql(
    model: type[Model], name: str, guard: tuple[str, ...]
) -> tuple[str, tuple[Field[Any, Any], ...], Field[Any, Any], tuple[Field[Any, Any], ...]]:
    meta = model._meta
    quote = connection.ops.quote_name
    (key,) = (f for f in meta.concrete_fields if f.primary_key)
    fields = tuple(f for f in meta.concrete_fields if not f.primary_key)
    by_attname = {f.attname: f for f in meta.concrete_fields}
    guarded = tuple(by_attname[attname] for attname in guard)
    assignments = ", ".join(
        f"{quote(f.column)} = CAST(%({name}__{f.attname})s AS {f.db_type(connection)})"
        for f in fields
    )
    conditions = [f"{quote(key.column)} = %({name}__{key.attname})s"] + [
        f"{quote(f.column)} = %({name}__guard__{f.attname})s" for f in guarded
    ]
    where = " AND ".join(conditions)
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {where}"  # noqa: S608 -- metadata only
    return sql, fields, key, guarded
