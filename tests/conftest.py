"""Shared fixtures: small real image trees and configs rooted in a temporary folder."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import PipelineConfig, parse_config
from pipeline.paths import StagePaths

REPO_ROOT = Path(__file__).resolve().parents[1]

# The step-counted recipe's floors off (pipeline/train/recipe.py): tests that only need *a* trained
# model train a few epochs of a tiny set at the batch they give, and never stop early.
FAST_RECIPE: dict[str, Any] = {
    "min_steps": 0,
    "min_steps_per_epoch": 1,
    "min_batch_size": 1,
    "patience_steps": 100_000,
}
NO_AUGMENT: dict[str, Any] = {
    "flip": "none",
    "rotation": 0.0,
    "zoom": 0.0,
    "translation": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "channel_shuffle": False,
}

# The parts of a flow run that only add time where the test's subject is elsewhere: the ONNX export,
# LIME and the gate's serving smoke test (about 12 s a flow run on 2 cores). Each has its own tests,
# and the committed params run them all in tests/integration/test_quiet_run.py.
OPTIONAL_PARTS_OFF: dict[str, Any] = {
    "export": {"onnx": False},
    "explain": {"lime": False},
    "gate": {"serving_smoke_test": False},
}


def digit_images(per_class: int, classes: int = 3, scale: int = 4) -> dict[str, list[np.ndarray]]:
    """Distinct real digits from scikit-learn, upscaled, grouped by class name."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    tree: dict[str, list[np.ndarray]] = {}
    for pixels, target in zip(images, digits.target, strict=True):
        if target < classes and len(tree.setdefault(str(target), [])) < per_class:
            tree[str(target)].append(pixels)
    return tree


def write_tree(root: Path, tree: dict[str, list[np.ndarray]], suffix: str = ".png") -> Path:
    """Write {class: [pixels]} as <root>/<class>/img_<i><suffix>."""
    for label, images in tree.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / label / f"img_{index:03d}{suffix}")
    return root


def tree_digest(root: Path) -> str:
    """One hash over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested-dict merge of `extra` into `into` (in place); returns `into`."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., tuple[PipelineConfig, StagePaths]]:
    """Build (cfg, paths) rooted at tmp_path from the repo's params.yaml plus overrides.

    Overrides are nested dicts merged into params, e.g. {"split": {"seed": 7}}.
    """
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def build(
        overrides: dict[str, Any] | None = None, root: Path | None = None
    ) -> tuple[PipelineConfig, StagePaths]:
        cfg = parse_config(merge(yaml.safe_load(yaml.safe_dump(base)), overrides or {}))
        return cfg, StagePaths.from_config(cfg.paths, root or tmp_path)

    return build


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """Three classes of 20 distinct 32x32 digit PNGs, outside the project's raw folder."""
    return write_tree(tmp_path / "source", digit_images(per_class=20))


# The slowest test files, slowest first (seconds in a full `make test` on 2 cores, 2026-12-03).
# pytest-xdist's --dist loadfile hands out whole files in queue order, and the Makefile turns off its
# default reordering by test count (--no-loadscope-reorder), which put one-test files such as the
# 270 s quiet run last, so one worker ran it alone at the end. Longest first, every other file after
# these in collection order, evens out the two workers.
SLOWEST_FILES = (
    "tests/model/test_own_images.py",  # 430
    "tests/integration/test_quiet_run.py",  # 272
    "tests/integration/test_production_backends.py",  # 174
    "tests/integration/test_loop.py",  # 155
    "tests/integration/test_flows.py",  # 151
    "tests/integration/test_retraining_flow.py",  # 145
    "tests/integration/test_tune.py",  # 141
    "tests/model/test_distill.py",  # 138
    "tests/model/test_distributed.py",  # 108
    "tests/model/test_detector_power.py",  # 102
    "tests/integration/test_prefect_postgres.py",  # 95
    "tests/integration/test_serving.py",  # 75
    "tests/integration/test_gate_registry.py",  # 71
    "tests/integration/test_serving_loop.py",  # 65
    "tests/model/test_compress.py",  # 63
    "tests/integration/test_no_orphans.py",  # 62
    "tests/model/test_resume.py",  # 46
    "tests/integration/test_gate_fails_closed.py",  # 32
    "tests/integration/test_serving_page.py",  # 20
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: place for place, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOWEST_FILES)))  # stable


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests use the project-local SQLite store under their own tmp root, never a shared server.

    `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI; a bare `delenv` of an unset variable
    records nothing to undo, so a value a test set that way outlived it in the xdist worker and sent
    later module fixtures to that test's store. Setting it first makes the undo remove it.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def sh(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a command with this venv's tools first on PATH (plus `env`); return stdout + stderr."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GX_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1",
        **(env or {}),
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def copy_project(target: Path, params: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The project's files as a fresh clone has them, in a new git repository at `target`.

    Args:
        target: an empty folder.
        params: optional edit of params.yaml (as a dict) before the commit.
    """
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target / name)
    if params is not None:  # round-trip edit, so params.yaml keeps its comments as a user's would
        from ruamel.yaml import YAML

        editor = YAML()
        document = editor.load((target / "params.yaml").read_text())
        params(document)
        with (target / "params.yaml").open("w") as handle:
            editor.dump(document, handle)
    sh(target, "git", "init", "-q")
    sh(target, "git", "add", "-A")
    sh(target, "git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "clone")
    return target
