"""The arrows between the worker's packages point down: what each may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKER = Path(__file__).parent.parent / "worker"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(under: str = "") -> list[Path]:
    return sorted((WORKER / under).rglob("*.py"))


def test_only_the_store_uses_sqlalchemy() -> None:
    using = [
        str(path.relative_to(WORKER))
        for path in _modules()
        if "store" not in path.relative_to(WORKER).parts
        and any(name.split(".")[0] == "sqlalchemy" for name in _imports(path))
    ]

    assert [] == using


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("store", ("worker.handlers", "worker.consumer", "worker.delivery", "worker.mail")),
        ("mail", ("worker.handlers", "worker.store", "worker.consumer", "worker.delivery")),
    ],
)
def test_lower_packages_import_nothing_above_them(package: str, forbidden: tuple[str, ...]) -> None:
    upward = {
        f"{path.relative_to(WORKER)}: {name}"
        for path in _modules(package)
        for name in _imports(path)
        if name.startswith(forbidden)
    }

    assert set() == upward
