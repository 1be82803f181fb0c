"""The shape the code keeps (DESIGN.md): five services over one core, never importing each other; the core
and the model families import no service; a family is asked through models/family.py, never by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "stagetune"
SERVICES = ("ingest", "vae", "text", "trainer", "validation")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = {f"stagetune.{name}" for name in SERVICES if name != service}
    bad = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in _modules(PACKAGE / service)
        for module in _imports(path)
        if any(module == other or module.startswith(other + ".") for other in others)
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize("layer", ["core", "models"])
def test_core_and_models_import_no_service(layer: str) -> None:
    services = {f"stagetune.{name}" for name in SERVICES}
    bad = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in _modules(PACKAGE / layer)
        for module in _imports(path)
        if any(module == s or module.startswith(s + ".") for s in services)
    }
    assert not bad, sorted(bad)


def test_stages_ask_the_family_protocol_not_a_family_module() -> None:
    """Only models/ (and the tiny-model tools) may name a family's own modules."""
    allowed = {"cli.py", "examples.py"}
    bad = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for layer in (*SERVICES, "core")
        for path in _modules(PACKAGE / layer)
        for module in _imports(path)
        if module.startswith("stagetune.models.sd3") and path.name not in allowed
    }
    assert not bad, sorted(bad)
