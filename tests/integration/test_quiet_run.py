"""What a newcomer sees: `python -m flows.training` (what `make run` runs) prints no false alarms, and
DVC reruns exactly the stages whose code changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.stages import STAGES
from tests.conftest import sh
from tests.integration.test_flows import small_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def stages_using(root: Path, module: str) -> set[str]:
    """The dvc.yaml stages whose deps cover a code file (the file itself or a folder holding it)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {
        name
        for name, stage in stages.items()
        if any(module == dep or module.startswith(f"{dep.rstrip('/')}/") for dep in stage["deps"])
    }


def test_a_flow_run_prints_no_false_alarms_and_a_code_change_reruns_its_users(tmp_path: Path):
    root = small_project(tmp_path / "project")
    # No PREFECT_API_URL: like `make run`, the flow starts and stops a temporary Prefect server.
    output = sh(root, "python", "-m", "flows.training", env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert "stages run: ingest, validate, split, baseline, train" in output, output[-3000:]

    false_alarms = [line for line in output.splitlines() if re.match(r"[EW]0000 ", line)]
    assert not false_alarms, "\n".join(false_alarms)
    assert "retracing" not in output
    assert " ERROR " not in output and "Traceback" not in output
    for stage in STAGES:  # each stage announces itself in one readable line
        assert f"{stage.name}: {stage.summary}" in output, stage.name

    with (root / "pipeline/ingest/images.py").open("a") as module:
        module.write("# a comment changes the file's hash, so every stage that uses it must rerun\n")
    status = sh(root, "dvc", "status")
    reported = {line.rstrip(":") for line in status.splitlines() if re.fullmatch(r"\w+:", line)}
    expected = stages_using(root, "pipeline/ingest/images.py")
    assert {"ingest", "baseline", "reference"} <= expected
    assert reported == expected, status
