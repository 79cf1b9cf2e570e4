"""`dvc repro` in a temporary copy of the repository: runs, caches, and reruns only what changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, sh, tree_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA_STAGES = ("ingest", "validate", "split")


def ran(output: str) -> set[str]:
    return {stage for stage in DATA_STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("clone"))


def test_repro_runs_once_then_only_what_changed(clone: Path):
    first = sh(clone, "dvc", "repro", *DATA_STAGES)
    assert ran(first) == set(DATA_STAGES)
    for out in (
        "data/manifest.csv",
        "data/quarantine.csv",
        "data/splits/test.csv",
        "reports/validation.json",
        "reports/split.json",
        "reports/data_docs/index.html",
    ):
        assert (clone / out).is_file(), out
    assert len(list((clone / "data/raw").rglob("*.png"))) == 1797
    test_split = (clone / "data/splits/test.csv").read_bytes()
    raw = tree_digest(clone / "data/raw")

    second = sh(clone, "dvc", "repro", *DATA_STAGES)
    assert ran(second) == set()
    assert "split" not in sh(clone, "dvc", "status", *DATA_STAGES)

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh(clone, "dvc", "repro", *DATA_STAGES)
    assert ran(third) == {"split"}
    assert (clone / "data/splits/test.csv").read_bytes() != test_split
    assert tree_digest(clone / "data/raw") == raw

    metrics = sh(clone, "dvc", "metrics", "show")
    assert "summary.accepted" in metrics and "totals.test" in metrics
