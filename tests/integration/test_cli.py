"""The CLI turns errors into one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_bad_params_fail_at_start_with_key_path(tmp_path: Path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["split"]["ratios"]["test"] = 0.3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_cli(tmp_path, "split")
    assert done.returncode == 2
    assert "split.ratios: train + val + test must sum to 1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # three CLI processes, each importing the pipeline: ~9 s on 2 cores
def test_ingest_then_split_without_validate_says_what_to_do(tmp_path: Path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_cli(tmp_path, "ingest").returncode == 0
    assert len(list((tmp_path / "data/raw").rglob("*.png"))) == 1797
    done = run_cli(tmp_path, "split")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "quarantine.csv" in done.stderr and "validate" in done.stderr
