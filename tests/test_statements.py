"""The SQL the statements modules run, as rendered at import.

tests/snapshots/statements.sql holds every statement's rendered text, so that a change to a
statement, or to a model's table, shows in a review's diff as the SQL that runs. After a
deliberate change, `make snapshots` writes the file again.
"""

import os
import re
from pathlib import Path
from types import ModuleType

import pytest
from django.apps import apps

from linking import statements as linking_statements
from workflows import statements as workflow_statements
from workflows.models import Workflow
from workflows.statements import with_tables

SNAPSHOT = Path(__file__).parent / "snapshots" / "statements.sql"
MODULES = (linking_statements, workflow_statements)
_SQL = re.compile(r"^\s*(WITH|SELECT|INSERT|UPDATE|DELETE)\b")


def _statements(module: ModuleType) -> dict[str, str]:
    return {
        name: value
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and _SQL.match(value)
    }


def _rendered() -> str:
    parts = []
    for module in MODULES:
        for name, sql in sorted(_statements(module).items()):
            parts.append(f"-- {module.__name__}.{name}\n{sql.strip()}\n")
    return "\n".join(parts)


def test_the_snapshot_is_the_sql_that_runs() -> None:
    rendered = _rendered()
    if os.environ.get("SNAPSHOT_UPDATE") == "1":
        SNAPSHOT.write_text(rendered)
    assert SNAPSHOT.read_text() == rendered, (
        "A statement changed: review the SQL and run `make snapshots` to record it."
    )


@pytest.mark.parametrize("module", MODULES, ids=[module.__name__ for module in MODULES])
def test_every_table_a_statement_names_is_a_models(module: ModuleType) -> None:
    # A table written out by hand (or left unrendered) would drift from its model's _meta.
    tables = {model._meta.db_table for model in apps.get_models()}
    for name, sql in _statements(module).items():
        ctes = set(re.findall(r"(\w+) AS \(", sql))
        named = re.findall(r"\b(?:FROM|JOIN|INTO|(?<!FOR )UPDATE)\s+(\w+)\b(?!\s*\()", sql)
        unknown = {table for table in named if table not in tables | ctes}
        assert not unknown, (name, unknown)
        assert "{" not in sql, name


def test_with_tables_names_each_model_by_its_table() -> None:
    assert with_tables("FROM {workflow} w", Workflow).split() == [
        "FROM",
        Workflow._meta.db_table,
        "w",
    ]
    # A model the statement names but did not list fails at import, not at run time.
    with pytest.raises(KeyError):
        with_tables("SELECT 1 FROM {customer}", Workflow)
