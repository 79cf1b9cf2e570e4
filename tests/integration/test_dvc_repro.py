"""`dvc repro` in a temporary copy of the repository: runs, caches, and reruns only what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tree_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GX_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in ("ingest", "validate", "split") if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The committed project files (what a fresh clone has) in a new git repository."""
    target = tmp_path_factory.mktemp("clone")
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
    sh(target, "git", "init", "-q")
    sh(target, "git", "add", "-A")
    sh(target, "git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "clone")
    return target


def test_repro_runs_once_then_only_what_changed(clone: Path):
    first = sh(clone, "dvc", "repro")
    assert ran(first) == {"ingest", "validate", "split"}
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

    second = sh(clone, "dvc", "repro")
    assert ran(second) == set()
    assert "up to date" in sh(clone, "dvc", "status")

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh(clone, "dvc", "repro")
    assert ran(third) == {"split"}
    assert (clone / "data/splits/test.csv").read_bytes() != test_split
    assert tree_digest(clone / "data/raw") == raw

    metrics = sh(clone, "dvc", "metrics", "show")
    assert "summary.accepted" in metrics and "totals.test" in metrics
