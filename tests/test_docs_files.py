"""The documentation can be found and stays true: docs/settings.md has one row per setting that
config/settings.py reads from the environment (and no other), every relative link in README.md and
docs/*.md reaches a file (and, with #anchor, a heading there), and README.md stays short."""

import ast
import re
from pathlib import Path

from tests.processes import ROOT

DOCS = ROOT / "docs"
SETTINGS_DOC = DOCS / "settings.md"
README = ROOT / "README.md"
README_MAX_LINES = 200

# config/env.py's readers: each takes the variable's name as its first argument.
ENV_READERS = {"env_str", "env_bool", "env_int", "env_float", "env_list", "env_int_list"}

# Variables the settings table may document although config/settings.py does not read them, each
# with what reads it instead. Empty today: config/settings.py reads every documented setting
# (PROMETHEUS_MULTIPROC_DIR too, besides config/metrics.py and config/gunicorn.py).
READ_ELSEWHERE: dict[str, str] = {}

# [text](target) or [text](target "title"); images and links inside code are not links to check.
LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
RAW_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a Markdown file, fenced code blocks left out."""
    kept, fence = [], ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        marker = FENCE.match(line)
        if marker:
            if not fence:
                fence = marker.group(1)
            elif marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = ""
            continue
        if not fence:
            kept.append((number, line))
    return kept


def _first_string_argument(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def environment_read_by(source: str) -> set[str]:
    """Every variable a settings module reads: through config/env.py's readers (as
    tests/test_settings.py's .env.example test finds them, but with ast), and through os.environ
    or os.getenv, should it ever read one directly."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ENV_READERS:
                name = _first_string_argument(node)
                assert name is not None, f"line {node.lineno}: {func.id}() without a literal name"
                names.add(name)
            elif isinstance(func, ast.Attribute) and (
                func.attr == "getenv"
                or (
                    func.attr == "get"
                    and isinstance(func.value, ast.Attribute)
                    and func.value.attr == "environ"
                )
            ):
                name = _first_string_argument(node)
                if name is not None:
                    names.add(name)
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "environ"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            names.add(node.slice.value)
    return names


def environment_read_by_settings() -> set[str]:
    return environment_read_by((ROOT / "config/settings.py").read_text())


def settings_table() -> list[list[str]]:
    """The cells of each row of docs/settings.md's one table, header and delimiter row left out."""
    lines = [line for _, line in prose_lines(SETTINGS_DOC) if line.lstrip().startswith("|")]
    rows = [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in lines
    ]
    assert rows, "docs/settings.md has no table"
    assert rows[0] == ["setting", "default", "meaning"], rows[0]
    assert all(re.fullmatch(r":?-{3,}:?", cell) for cell in rows[1]), rows[1]
    return rows[2:]


def documented_settings() -> list[str]:
    names = []
    for row in settings_table():
        found = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", row[0])
        assert found, f"docs/settings.md: a row's first cell is one `NAME`, got {row[0]!r}"
        names.append(found.group(1))
    return names


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text (inline code's content kept; raw HTML
    tags, link targets and emphasis dropped), lowercased, punctuation removed (letters, digits,
    '_', '-' and spaces kept), each space a '-'."""
    parts = []
    for index, piece in enumerate(INLINE_CODE.split(heading)):
        if index % 3 == 2:  # the content of an inline code span
            parts.append(piece)
        elif index % 3 == 0:
            piece = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", piece)
            piece = RAW_HTML_TAG.sub("", piece)
            parts.append(re.sub(r"\\(.)", r"\1", piece).replace("*", ""))
    text = re.sub(r"[^\w\- ]", "", "".join(parts).lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
                links.append((number, target))
    return links


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_every_setting_read_from_the_environment_has_a_row_in_docs_settings() -> None:
    read = environment_read_by_settings()
    assert len(read) > 50  # the parser still finds them
    missing = sorted(read - set(documented_settings()))
    assert missing == [], "config/settings.py reads these: add a row to docs/settings.md for each"


def test_every_row_of_docs_settings_names_a_setting_that_is_read() -> None:
    read = environment_read_by_settings()
    documented = documented_settings()
    assert sorted({name for name in documented if documented.count(name) > 1}) == []
    unknown = sorted(set(documented) - read - set(READ_ELSEWHERE))
    assert unknown == [], "config/settings.py reads none of these (READ_ELSEWHERE if another does)"
    # A variable stays listed as read elsewhere only while settings.py does not read it.
    assert sorted(set(READ_ELSEWHERE) & read) == []
    for row in settings_table():
        assert len(row) == 3 and row[1] and row[2], f"a default and a meaning: {row}"


def test_a_setting_added_to_settings_py_is_seen() -> None:
    # What the first test relies on: a new env_*("NAME", …) call is found, whatever its reader
    # and however it is wrapped, and so is a direct read of os.environ.
    for reader in sorted(ENV_READERS):
        source = f'X = int(\n    {reader}(\n        "SOME_NEW_SETTING", 1, minimum=0\n    )\n)'
        assert environment_read_by(source) == {"SOME_NEW_SETTING"}
    assert environment_read_by('import os\nX = os.environ["A"] + os.getenv("B", "")') == {"A", "B"}
    assert "SOME_NEW_SETTING" not in documented_settings()


def test_the_slugs_are_githubs() -> None:
    assert github_slug("Broker: RabbitMQ") == "broker-rabbitmq"
    assert github_slug("The design's questions, answered") == "the-designs-questions-answered"
    assert github_slug("Asynchronous internal search (`INTERNAL_SEARCH_ASYNC=true`)") == (
        "asynchronous-internal-search-internal_search_asynctrue"
    )
    assert github_slug("Customer review: `POST /link/<workflow-id>/decision`") == (
        "customer-review-post-linkworkflow-iddecision"
    )
    # Outside code, <workflow-id> is a raw HTML tag: GitHub drops it from the text and the anchor.
    assert github_slug("GET /patient/<patient-id>") == "get-patient"
    assert github_slug("Health checks and logs") == "health-checks-and-logs"


def test_every_relative_link_reaches_a_file_and_its_heading() -> None:
    broken = []
    checked = 0
    for path in markdown_files():
        for number, target in relative_links(path):
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{where}: no heading there makes that anchor")
    assert checked > 30  # the pattern still finds them
    assert broken == []


def test_the_readme_links_every_file_under_docs() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve() for _, target in relative_links(README)
    }
    files = sorted(DOCS.rglob("*.md"))
    assert len(files) >= 10
    assert [str(file.relative_to(ROOT)) for file in files if file.resolve() not in linked] == []


def test_the_readme_is_short() -> None:
    count = len(README.read_text().splitlines())
    assert count < README_MAX_LINES, f"README.md has {count} lines: move sections to docs/"
