"""The layers stay apart: pipeline/ (stages and the model side of serving) imports no orchestrator and
no web framework, so a stage runs under `dvc repro` and the model side serves under any HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

FORBIDDEN = ("prefect", "fastapi", "starlette", "uvicorn", "flask")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_pipeline_imports_no_orchestrator_and_no_web_framework() -> None:
    modules = sorted((REPO_ROOT / "pipeline").rglob("*.py"))
    assert len(modules) > 50 and REPO_ROOT / "pipeline/serving/service.py" in modules
    found = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in modules
        for name in imported_roots(path) & set(FORBIDDEN)
    }
    assert not found, found


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "late.py"
    module.write_text("def app():\n    from fastapi import FastAPI\n    import prefect.flows\n")
    assert imported_roots(module) & set(FORBIDDEN) == {"fastapi", "prefect"}
