"""A tiny project with real digit images, split once per session, and a small CNN trained on it.

Building the data (ingest, validate with Great Expectations, split) and training
are the slow parts, so they run once per session. Tests that train themselves or
change the project get their own copy of the prepared data (`project_copy`), so
no test sees another test's model, MLflow store or training backup.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import ingest, split, train, validate
from pipeline.config import PipelineConfig, parse_config
from pipeline.paths import StagePaths
from tests.conftest import FAST_RECIPE, NO_AUGMENT, REPO_ROOT, digit_images, merge, write_tree

# 3 classes x 40 distinct digits, 32x32 PNGs; 20 % of them (24 images) form the test split.
CLASSES = 3
PER_CLASS = 40
SCALE = 4

BASE_OVERRIDES: dict[str, Any] = {
    "validate": {"min_images_per_class": 5},
    "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "train": {
        "model": "small_cnn",
        "image_size": 32,
        "batch_size": 8,
        "epochs": 10,
        "learning_rate": 0.001,
        **FAST_RECIPE,
        "augment": NO_AUGMENT,
    },
    "export": {"calibration_images": 30},
    "evaluate": {"latency_images": 5},
}


def build_config(root: Path, *overrides: dict[str, Any]) -> tuple[PipelineConfig, StagePaths]:
    """The repo's params.yaml with BASE_OVERRIDES and then each of `overrides` merged in, rooted at root."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    merge(raw, yaml.safe_load(yaml.safe_dump(BASE_OVERRIDES)))
    for extra in overrides:
        merge(raw, yaml.safe_load(yaml.safe_dump(extra)))
    cfg = parse_config(raw)
    return cfg, StagePaths.from_config(cfg.paths, root)


@contextmanager
def local_tracking() -> Iterator[None]:
    """Use the SQLite store under each project root, never a server named in the environment.

    tests/conftest.py's autouse fixture does this per test, but session- and
    module-scoped fixtures are set up before it runs. mlflow.set_tracking_uri
    (called by pipeline.tracking.configure) exports MLFLOW_TRACKING_URI, so the
    variable is also cleared on the way out: no project's store leaks into the next.
    """
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@dataclass(frozen=True)
class Project:
    """A project root and its config."""

    cfg: PipelineConfig
    paths: StagePaths


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root after ingest, validate and split; copy it with `project_copy`, never write into it."""
    base = tmp_path_factory.mktemp("model_data")
    source = write_tree(base / "incoming", digit_images(per_class=PER_CLASS, classes=CLASSES, scale=SCALE))
    root = base / "project"
    root.mkdir()
    cfg, paths = build_config(root, {"ingest": {"source": "folder", "folder": {"path": str(source)}}})
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)
    return root


@pytest.fixture
def project_copy(prepared_data: Path, tmp_path: Path):
    """Copy the prepared data into a fresh root under tmp_path; returns a builder of Project."""

    def build(*overrides: dict[str, Any]) -> Project:
        root = tmp_path / "project"
        if not root.exists():
            shutil.copytree(prepared_data, root)
        cfg, paths = build_config(root, *overrides)
        return Project(cfg, paths)

    return build


@pytest.fixture(scope="session")
def trained_project(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the prepared data with the small CNN trained on it (models/keras/model.keras)."""
    root = tmp_path_factory.mktemp("model_trained") / "project"
    shutil.copytree(prepared_data, root)
    cfg, paths = build_config(root)
    with local_tracking():
        train.run(cfg, paths)
    return Project(cfg, paths)
