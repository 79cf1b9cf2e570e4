"""The Prefect training flow on a real temporary Prefect server, agreeing with DVC."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness

from flows.deployments import build_deployments
from flows.training import training_flow
from pipeline.config import load_config
from pipeline.errors import DataValidationError
from tests.conftest import (
    FAST_RECIPE,
    NO_AUGMENT,
    OPTIONAL_PARTS_OFF,
    REPO_ROOT,
    copy_project,
    digit_images,
    merge,
    sh,
    write_tree,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def small_project(
    target: Path,
    per_class: int = 40,
    extra: Callable[[dict], None] | None = None,
    everything: bool = False,
) -> Path:
    """A git + DVC copy of the project whose source is a small digits tree next to it.

    `extra` edits the params after these defaults (a test's own epochs, gate or model name).
    Every stage runs, without the optional parts (tests/conftest.OPTIONAL_PARTS_OFF) unless
    `everything`.
    """
    source = write_tree(target.parent / f"{target.name}-images", digit_images(per_class=per_class))

    def edit(params: dict) -> None:
        params["ingest"].update({"source": "folder", "folder": {"path": str(source)}})
        params["validate"]["min_images_per_class"] = 5
        params["train"].update({"epochs": 10, "batch_size": 8, **FAST_RECIPE, "augment": NO_AUGMENT})
        params["export"]["calibration_images"] = 20
        params["gate"].update(
            {
                "min_accuracy": 0.5,
                "min_macro_f1": 0.5,
                "min_margin_over_baseline": -1.0,
                "max_int8_accuracy_drop": 0.2,
            }
        )
        params["mlflow"]["registered_model"] = "flow-test"
        if not everything:
            merge(params, copy.deepcopy(OPTIONAL_PARTS_OFF))
        if extra is not None:
            extra(params)

    target.mkdir()
    return copy_project(target, edit)


def flow_run_artifacts(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact.data for artifact in found}


def test_flow_runs_every_stage_and_dvc_agrees(tmp_path: Path):
    root = small_project(tmp_path / "project", everything=True)
    state = training_flow(root=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert set(state.result().values()) == {"ran"}

    published = flow_run_artifacts(state.state_details.flow_run_id)
    assert {
        "validation",
        "split-counts",
        "test-metrics",
        "robustness",
        "export-table",
        "gate-checks",
        "mlflow-run",
    } <= set(published)
    assert "| int8 |" in published["export-table"] and "min_accuracy" in published["gate-checks"]
    assert "| onnx (onnxruntime) |" in published["export-table"] and "ONNX: ok" in published["export-table"]
    assert "| contrast |" in published["robustness"] and "min_fgsm_accuracy" in published["gate-checks"]
    gate = json.loads((root / "reports/gate.json").read_text())
    assert gate["checks"]["serving_smoke_test"]["status"] == "passed"
    assert (root / "reports/explain/index.html").is_file() and (root / "models/onnx/model.onnx").is_file()
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert run_id in published["mlflow-run"]

    assert "up to date" in sh(root, "dvc", "status")
    assert "Running stage" not in sh(root, "dvc", "repro")

    again = training_flow(root=str(root))
    assert set(again.values()) == {"skipped"}


def mlflow_run_of(root: Path) -> mlflow.entities.Run:
    """The MLflow run the project's last training started."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.get_run(json.loads((root / "models/mlflow_run.json").read_text())["run_id"])


def test_an_override_applies_to_its_own_run_only(tmp_path: Path):
    root = small_project(tmp_path / "project")
    committed = (root / "params.yaml").read_bytes()
    # return_state: the gate's verdict on the short run does not matter here
    training_flow(root=str(root), epochs=3, overrides={"train.batch_size": 16}, return_state=True)
    assert (root / "params.yaml").read_bytes() == committed
    assert sh(root, "git", "diff", "--stat", "params.yaml") == ""
    override_run = mlflow_run_of(root)
    assert (
        override_run.data.params["train.epochs"] == "3"
        and override_run.data.params["train.batch_size"] == "16"
    )
    assert json.loads(override_run.data.tags["pipeline.overrides"]) == {
        "train.batch_size": 16,
        "train.epochs": 3,
    }
    experiment = override_run.data.tags["dvc.experiment"]
    assert experiment.startswith("override-"), experiment
    assert experiment in sh(root, "dvc", "exp", "list")  # the DVC state the override produced is kept
    assert "train" in sh(root, "dvc", "status")  # the workspace's outputs are the override's

    plain = training_flow(root=str(root))
    assert (root / "params.yaml").read_bytes() == committed
    assert sh(root, "git", "diff", "--stat", "params.yaml") == ""
    assert plain["train"] == "ran" and plain["split"] == "skipped"
    plain_run = mlflow_run_of(root)
    assert plain_run.info.run_id != override_run.info.run_id
    committed_cfg = load_config(root / "params.yaml")
    assert plain_run.data.params["train.epochs"] == str(committed_cfg.train.epochs) == "10"
    assert plain_run.data.params["train.batch_size"] == str(committed_cfg.train.batch_size)
    assert "pipeline.overrides" not in plain_run.data.tags
    assert "up to date" in sh(root, "dvc", "status")


def test_bad_override_fails_before_any_stage(tmp_path: Path):
    root = small_project(tmp_path / "project", per_class=6)
    state = training_flow(root=str(root), overrides={"train.epochz": 3}, return_state=True)
    assert state.is_failed() and "override train.epochz: unknown key 'epochz'" in state.message
    assert not (root / "data" / "manifest.csv").exists()


def test_validation_failure_stops_the_flow_naming_the_class(tmp_path: Path):
    root = small_project(tmp_path / "project", per_class=12)
    lonely = tmp_path / "project-images" / "7"
    lonely.mkdir()
    shutil.copy(tmp_path / "project-images" / "0" / "img_000.png", lonely / "only.png")
    (tmp_path / "project-images" / "0" / "img_000.png").unlink()

    state = training_flow(root=str(root), return_state=True)
    assert state.is_failed()
    assert "class '7' has 1 usable image" in state.message
    with pytest.raises(DataValidationError, match="class '7' has 1 usable image"):
        state.result()
    published = flow_run_artifacts(state.state_details.flow_run_id)
    assert "**FAIL**" in published["validation"]
    assert not (root / "data" / "splits").exists()


def test_deployments_register_with_schedules_and_concurrency(tmp_path: Path):
    import asyncio

    from flows.deployments import ensure_work_pool

    cfg = load_config().orchestration
    deployments = {d.name: d for d in build_deployments(cfg)}
    assert set(deployments) == {"training", "drift-check", "tuning"}
    asyncio.run(ensure_work_pool(cfg.work_pool))
    for deployment in deployments.values():
        deployment.apply(work_pool_name=cfg.work_pool)

    with get_client(sync_client=True) as client:
        training = client.read_deployment_by_name("training/training")
        drift = client.read_deployment_by_name("drift-check/drift-check")
        tuning = client.read_deployment_by_name("tuning/tuning")
        pool = client.read_work_pool(cfg.work_pool)
    assert [s.schedule.cron for s in training.schedules] == [cfg.training_cron]
    assert [s.schedule.cron for s in drift.schedules] == [cfg.drift_check_cron]
    assert training.global_concurrency_limit.limit == 1
    assert training.concurrency_options.collision_strategy == "ENQUEUE"
    assert training.work_pool_name == drift.work_pool_name == cfg.work_pool and pool.type == "process"
    assert training.entrypoint == "flows/training.py:training_flow"
    assert tuning.entrypoint == "flows/tuning.py:tuning_flow" and not tuning.schedules  # on demand only
    assert tuning.work_pool_name == cfg.work_pool and tuning.global_concurrency_limit is None
    step = training.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert Path(step["directory"]).resolve() == REPO_ROOT  # the worker runs this checkout
