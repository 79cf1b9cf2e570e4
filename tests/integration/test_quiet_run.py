"""What a newcomer sees: `make run` (`python -m flows.training`) on the embedded digits with params.yaml
as committed passes the gate, registers a champion whose lineage is complete, prints no false alarms,
and DVC reruns exactly the stages whose code changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import tracking
from pipeline.config import load_config
from pipeline.stages import STAGES
from tests.conftest import copy_project, sh

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def stages_using(root: Path, module: str) -> set[str]:
    """The dvc.yaml stages whose deps cover a code file (the file itself or a folder holding it)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {
        name
        for name, stage in stages.items()
        if any(module == dep or module.startswith(f"{dep.rstrip('/')}/") for dep in stage["deps"])
    }


def assert_champion_lineage(root: Path) -> None:
    """The champion leads back to everything a data scientist needs to trust or reproduce it."""
    cfg = load_config(root / "params.yaml", root)
    tracking.configure(cfg.mlflow, root)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    run = client.get_run(champion.run_id)
    assert run.info.run_id == json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    tags, params = run.data.tags, run.data.params

    assert (
        tags["mlflow.source.git.commit"].removesuffix("-dirty")
        == sh(root, "git", "rev-parse", "HEAD").strip()
    )
    outs = {
        out["path"]: out["md5"]
        for stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].values()
        for out in stage.get("outs", [])
    }
    assert tags["dvc.raw_md5"] == outs["data/raw"] and tags["dvc.splits_md5"] == outs["data/splits"]
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "val", "test"}
    flat = tracking.flat_params(cfg)
    assert {key: params[key] for key in flat} == flat  # every param, as committed
    # The digits' 1,258 training images at batch 64 make 20-step epochs; 30 epochs are the 600-step floor.
    assert (params["recipe.image_size"], params["recipe.batch_size"], params["recipe.first.steps"]) == (
        "32",
        "64",
        "600",
    )
    assert tags["gate.passed"] == "True"

    gate = json.loads((root / "reports/gate.json").read_text())
    assert gate["passed"] and gate["champion_version"] is None  # the first model: nothing to compare with
    statuses = {name: check["status"] for name, check in gate["checks"].items()}
    optional = ("pruned_accuracy_drop", "min_fgsm_accuracy", "max_corruption_drop")  # unset in params.yaml
    assert [statuses.pop(name) for name in optional] == ["skipped"] * len(optional)
    assert statuses.pop("no_regression_vs_champion") == "skipped" and set(statuses.values()) == {"passed"}
    assert gate["checks"]["min_accuracy"]["threshold"] == cfg.gate.min_accuracy == 0.95  # the product's own
    assert gate["checks"]["margin_over_baseline"]["threshold"] == cfg.gate.min_margin_over_baseline

    artifacts = {
        a.path for folder in ("", "reports", "tflite") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"reports/gate.json", "reports/metrics.json", "reports/export.json", "labels.txt"} <= artifacts
    tflite = {Path(p).name for p in artifacts if p.startswith("tflite/")}
    assert {"model_float32.tflite", "model_int8.tflite"} <= tflite, artifacts


def test_make_run_on_the_committed_params_passes_the_gate_prints_no_false_alarms(tmp_path: Path):
    root = copy_project(tmp_path / "project")  # the embedded digits, params.yaml as committed
    # No PREFECT_API_URL: like `make run`, the flow starts and stops a temporary Prefect server.
    output = sh(root, "python", "-m", "flows.training", env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert "stages run: ingest, validate, split, baseline, train" in output, output[-3000:]
    assert_champion_lineage(root)

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
