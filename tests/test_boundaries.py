"""The apps' imports point one way (docs/architecture.md "Boundaries"): merchant < workflows <
linking < config. A module may import from its own package and the packages below it, never
above: an import the other way fails here with the module, line and target, and so does a cycle.

Read from the source (ast), every import in every function included, so a lazy import inside a
function cannot hide an arrow."""

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from tests.processes import ROOT

LAYERS = ("merchant", "workflows", "linking", "config")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file; `from a import b` names a.b when
    b is a module, else a."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = _module_name(path).split(".")
                if path.name != "__init__.py":
                    base.pop()
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                yield node.lineno, candidate if _is_module(candidate) else module


def app_imports() -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) across the four packages, migrations aside."""
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            for line, target in imports_of(path):
                if target.split(".")[0] in LAYERS:
                    found.append((_module_name(path), line, target))
    return found


def _rank(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_app_imports_a_layer_above_it() -> None:
    upward = [
        f"{source}:{line} imports {target}"
        for source, line, target in app_imports()
        if _rank(target) > _rank(source)
    ]
    assert upward == [], "imports against the layers " + " < ".join(LAYERS)


def test_the_packages_form_no_cycle() -> None:
    """Package -> package arrows: a graph without a cycle."""
    arrows: dict[str, set[str]] = defaultdict(set)
    for source, _, target in app_imports():
        arrows[source.split(".")[0]].add(target.split(".")[0])
    for package in LAYERS:
        arrows[package].discard(package)

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            step == goal or (step not in seen and reaches(step, goal, seen | {step}))
            for step in arrows[start]
        )

    assert [package for package in LAYERS if reaches(package, package)] == []


def test_the_modules_form_no_cycle() -> None:
    """Module -> module arrows, inside an app too: a cycle there is held together by an import
    inside a function (the only way Python lets it load), which hides which module is lower."""
    arrows: dict[str, set[str]] = defaultdict(set)
    for source, _, target in app_imports():
        if target != source:
            arrows[source].add(target)
    cycles = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(arrows[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(arrows):
        visit(module, [])
    assert cycles == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The reader finds an import inside a function and resolves a relative one."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from linking.services import links_process\n")
    assert list(imports_of(source)) == [(2, "linking.services")]
    found = {target for _, target in imports_of(ROOT / "workflows" / "services" / "__init__.py")}
    assert any(target.startswith("workflows.services.") for target in found), found


def test_no_template_names_a_page_of_a_layer_above_it() -> None:
    # An admin URL name ("admin:<app>_<model>_...") in a template is a dependency too.
    upward = [
        f"{path.relative_to(ROOT)} names {label}"
        for layer in LAYERS
        for path in sorted((ROOT / layer).rglob("*.html"))
        for label in re.findall(r"admin:([a-z]+)_", path.read_text())
        if label in LAYERS and LAYERS.index(label) > LAYERS.index(layer)
    ]
    assert upward == []
