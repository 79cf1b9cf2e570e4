"""dvc.yaml agrees with the stage registry and with the code each stage runs.

A stage must rerun when, and only when, code it uses changes: every project module a stage
imports (transitively) is covered by its `deps` in dvc.yaml, and no code dep lists a file the
stage never imports. The registry `pipeline.stages.STAGES` names the same stages as dvc.yaml,
in an order that respects dvc.yaml's graph (a stage comes after the stages whose outputs it
reads). Pure AST and YAML parsing: nothing is imported from the stages, nothing is run.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = REPO_ROOT / "dvc.yaml"
PARAMS_YAML = REPO_ROOT / "params.yaml"
TOP_PACKAGE = "pipeline"
TEMPLATE = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")
OUTPUT_KINDS = ("outs", "metrics", "plots")


# --- dvc.yaml -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DvcStage:
    """A dvc.yaml stage reduced to what decides when it reruns: resolved, normalised paths."""

    name: str
    deps: tuple[str, ...]
    outputs: tuple[str, ...]


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    """Resolve `${a.b}` the way DVC does, so a typo in a template fails here and not in `dvc repro`."""
    value: Any = params
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"dvc.yaml template ${{{dotted}}} is not defined in params.yaml")
        value = value[key]
    return value


def _normalise(path: str) -> str:
    """Compare paths textually, as DVC does: repo-relative, posix, without './' or a trailing '/'."""
    while path.startswith("./"):
        path = path[2:]
    return path.rstrip("/")


def _entry_path(entry: str | dict[str, Any], params: dict[str, Any]) -> str:
    """An out/metrics/plots item may be `path` or `{path: options}`; only the path matters here."""
    if isinstance(entry, dict):
        if len(entry) != 1:
            raise ValueError(f"dvc.yaml entry {entry!r} should be a one-key mapping {{path: options}}")
        (entry,) = entry
    resolved = TEMPLATE.sub(lambda match: str(_lookup(params, match.group(1))), str(entry))
    return _normalise(resolved)


@cache
def dvc_stages() -> dict[str, DvcStage]:
    """Parsed once per session: every test reads the same two YAML files."""
    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    document = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))
    stages: dict[str, DvcStage] = {}
    for name, body in (document.get("stages") or {}).items():
        deps = tuple(_entry_path(entry, params) for entry in body.get("deps") or [])
        outputs = tuple(_entry_path(entry, params) for kind in OUTPUT_KINDS for entry in body.get(kind) or [])
        stages[name] = DvcStage(name=name, deps=deps, outputs=outputs)
    return stages


def contains(outer: str, inner: str) -> bool:
    """DVC tracks a directory as a whole: a dep on a folder covers every file below it."""
    return inner == outer or inner.startswith(outer + "/")


# --- the import graph -----------------------------------------------------------------------------


def is_project_module(module: str) -> bool:
    """Only the project's own code decides when a stage reruns; third-party code is pinned elsewhere."""
    return module == TOP_PACKAGE or module.startswith(TOP_PACKAGE + ".")


def module_file(module: str) -> Path | None:
    """Where Python would load `module` from in this checkout; None when no such module exists."""
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    """Imports under `if TYPE_CHECKING:` never run, so they cannot change what a stage computes."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _relative_base(module: str, is_package: bool, level: int, target: str | None) -> str:
    """`from .x import y` is relative to the importing module's package, as the interpreter resolves it."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    if target:
        parts = [*parts, *target.split(".")]
    return ".".join(parts)


class _ImportCollector(ast.NodeVisitor):
    """Imports anywhere in a file count (function-level ones too): stages import lazily to stay light."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.imported: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        # `import pipeline.a.b` loads pipeline.a.b (and its parents, see walk_imports).
        self.imported.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = _relative_base(self.module, self.is_package, node.level, node.module)
        else:
            base = node.module or ""
        for alias in node.names:
            # `from pipeline.a import b`: b is a submodule when such a file exists, else a name in pipeline.a.
            submodule = f"{base}.{alias.name}"
            if alias.name != "*" and module_file(submodule) is not None:
                self.imported.add(submodule)
            else:
                self.imported.add(base)


def direct_imports(module: str, path: Path) -> set[str]:
    """One file's project imports, so the walk can follow them without importing (and running) anything."""
    collector = _ImportCollector(module, is_package=path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {name for name in collector.imported if is_project_module(name)}


@dataclass(frozen=True)
class ImportGraph:
    """What a stage's code reaches: the repo-relative files it loads, and project imports with no file."""

    files: frozenset[str]
    missing: frozenset[str]


@cache
def walk_imports(start: str) -> ImportGraph:
    """Transitive project imports of `start`, as files: the code whose change must rerun the stage.

    Parent packages' `__init__.py` files are NOT followed just because a submodule was imported,
    although Python executes them: what a stage uses is the submodule, and following parents would
    force every stage to depend on a whole package. A package's `__init__.py` is followed when the
    package itself is imported (`from pipeline import ingest`, `import pipeline.train`). The top
    package `pipeline/__init__.py` is skipped: it holds only the version string.
    """
    files: set[str] = set()
    missing: set[str] = set()
    seen: set[str] = set()
    pending = [start]
    while pending:
        module = pending.pop()
        if module in seen or module == TOP_PACKAGE:
            continue
        seen.add(module)
        path = module_file(module)
        if path is None:
            missing.add(module)
            continue
        files.add(path.relative_to(REPO_ROOT).as_posix())
        pending.extend(direct_imports(module, path) - seen)
    return ImportGraph(files=frozenset(files), missing=frozenset(missing))


# --- the tests ------------------------------------------------------------------------------------

STAGE_MODULES = {stage.name: stage.module for stage in STAGES}


def test_registry_matches_dvc_yaml() -> None:
    dvc = dvc_stages()
    registry_names = [stage.name for stage in STAGES]
    only_registry = sorted(set(registry_names) - set(dvc))
    only_dvc = sorted(set(dvc) - set(registry_names))
    assert not only_registry and not only_dvc, (
        f"pipeline.stages.STAGES and dvc.yaml name different stages: only in STAGES {only_registry}, "
        f"only in dvc.yaml {only_dvc}"
    )
    assert len(registry_names) == len(set(registry_names)), f"STAGES names a stage twice: {registry_names}"

    position = {name: index for index, name in enumerate(registry_names)}
    problems: list[str] = []
    for reader in dvc.values():
        for dep in reader.deps:
            for writer in dvc.values():
                if writer.name == reader.name:
                    continue
                for output in writer.outputs:
                    if (contains(output, dep) or contains(dep, output)) and (
                        position[writer.name] > position[reader.name]
                    ):
                        problems.append(
                            f"stage '{reader.name}' depends on '{dep}', written by stage '{writer.name}' "
                            f"as '{output}', but STAGES runs '{writer.name}' after '{reader.name}'"
                        )
    assert not problems, "STAGES is not a topological order of dvc.yaml:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", list(STAGE_MODULES))
def test_dvc_deps_cover_imported_modules(name: str) -> None:
    module = STAGE_MODULES[name]
    assert module_file(module) is not None, (
        f"stage '{name}': its module {module} has no file (neither {module.replace('.', '/')}.py "
        f"nor {module.replace('.', '/')}/__init__.py)"
    )
    stage = dvc_stages().get(name)
    assert stage is not None, f"stage '{name}' is in pipeline.stages.STAGES but not in dvc.yaml"

    graph = walk_imports(module)
    uncovered = sorted(file for file in graph.files if not any(contains(dep, file) for dep in stage.deps))
    lines = [f"  {file}" for file in uncovered]
    lines += [f"  {missing} (imported, but no such module in the repo)" for missing in sorted(graph.missing)]
    assert not lines, (
        f"stage '{name}' ({module}) imports code that its dvc.yaml deps do not cover, so changing it "
        "would not rerun the stage; add it to the stage's deps in dvc.yaml:\n" + "\n".join(lines)
    )


def test_no_stale_code_deps() -> None:
    problems: list[str] = []
    compared = 0
    for name, stage in dvc_stages().items():
        module = STAGE_MODULES.get(name)
        if module is None or module_file(module) is None:
            problems.append(f"stage '{name}': no module file to compare its deps with ({module})")
            continue
        files = walk_imports(module).files
        for dep in stage.deps:
            if not contains(TOP_PACKAGE, dep):
                continue
            compared += 1
            if not any(contains(dep, file) for file in files):
                exists = "" if (REPO_ROOT / dep).exists() else " (and it does not exist)"
                problems.append(f"stage '{name}': dep '{dep}' is code the stage does not import{exists}")
    assert compared, f"no dvc.yaml dep lies under {TOP_PACKAGE}/: nothing was compared"
    assert not problems, (
        "dvc.yaml lists code deps that the stage never imports, so changing them reruns it needlessly; "
        "remove them from the stage's deps:\n" + "\n".join(problems)
    )
