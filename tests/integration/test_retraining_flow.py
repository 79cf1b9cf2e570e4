"""The retraining loop end to end on a real temporary Prefect server: drift -> DVC -> train -> gate."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from prefect.testing.utilities import prefect_test_harness

import flows.retraining as retraining
from flows.locks import file_lock
from flows.retraining import drift_check_flow
from flows.training import training_flow
from pipeline import tracking
from pipeline.artifacts import read_split
from pipeline.config import load_config
from pipeline.monitoring.shifts import brightness, unchanged, write_batch
from pipeline.paths import StagePaths
from tests.conftest import digit_images, sh, tree_digest, write_tree
from tests.integration.test_flows import flow_run_artifacts, small_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def land(root: Path, name: str, shift, labelled: bool = True) -> Path:
    """A batch of digits the project has never seen (images 40..69 of each class), shifted."""
    fresh = {label: images[40:70] for label, images in digit_images(per_class=70).items()}
    images = write_tree(root.parent / f"{name}-source", fresh)
    files = sorted(images.rglob("*.png"))
    labels = [p.parent.name for p in files] if labelled else None
    return write_batch(files, labels, root / "data" / "landing" / name, shift, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small project after one training flow, shared by this module's tests, which run in file
    order: the clean check (its retrain keeps the data, so the model is the same) before the drifted
    one (which adds brightened images to the data, and so to the next reference)."""
    root = small_project(tmp_path_factory.mktemp("retraining") / "project")
    with pytest.MonkeyPatch.context() as patch:  # module fixtures run before the autouse unset
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        training_flow(root=str(root))
    return root


def project_with_a_champion(root: Path):
    """The shared project: (root, config, MLflow client, the champion version now)."""
    cfg = load_config(root / "params.yaml", root)
    tracking.configure(cfg.mlflow, root)
    client = mlflow.MlflowClient()
    return root, cfg, client, client.get_model_version_by_alias("flow-test", "champion")


def test_clean_batches_do_not_retrain_until_the_champion_is_too_old(trained: Path):
    root, cfg, client, first = project_with_a_champion(trained)
    registered = len(client.search_model_versions("name = 'flow-test'"))
    trained_at = (root / "models/keras/model.keras").stat().st_mtime

    # Unshifted digits the model never saw, labelled: no detector may fire, nothing is trained.
    clean = land(root, "clean", unchanged())
    summary = drift_check_flow(root=str(root), settle_seconds=0, overrides={"drift.cooldown_hours": 0})
    assert summary["batches"] == {"clean": "no drift"}, summary
    assert "training" not in summary and summary["decision"].startswith("no drift"), summary
    assert not clean.exists() and (root / "data/landing_archive/processed/clean").is_dir()
    assert len(client.search_model_versions("name = 'flow-test'")) == registered
    assert (root / "models/keras/model.keras").stat().st_mtime == trained_at
    assert not (root / "data/batches/clean.dvc").exists()

    # The same clean landing area, but a champion older than drift.max_model_age_days: retrain anyway,
    # on the data as it is (no new batch). Training is deterministic (same data, params and seed), so
    # the candidate equals the champion on the same test split, passes the gate and is promoted.
    aged = drift_check_flow(
        root=str(root),
        settle_seconds=0,
        overrides={"drift.cooldown_hours": 0, "drift.max_model_age_days": 1e-5},  # about a second
    )
    assert aged["batches"] == {} and "days old" in aged["decision"], aged
    assert "training" in aged, aged
    assert (root / "models/keras/model.keras").stat().st_mtime > trained_at  # train was forced
    versions = client.search_model_versions("name = 'flow-test'")
    assert len(versions) == registered + 1
    gate = json.loads((root / "reports/gate.json").read_text())
    assert gate["passed"] and gate["champion_version"] == str(first.version), gate
    assert gate["checks"]["no_regression_vs_champion"]["status"] == "passed"
    champion = client.get_model_version_by_alias("flow-test", "champion")
    assert champion.version != first.version and "new champion" in aged["training"], aged
    assert "up to date" in sh(root, "dvc", "status")


def test_a_drifted_labelled_batch_retrains_and_the_better_model_is_promoted(trained: Path):
    root, cfg, client, first = project_with_a_champion(trained)
    registered = len(client.search_model_versions("name = 'flow-test'"))

    val = read_split(StagePaths.from_config(cfg.paths, root), "val")
    quiet = write_batch(  # the reference's own images: no detector can see a difference
        [root / p for p in val["path"]], list(val["label"]), root / "data/landing/quiet", unchanged(), 0
    )
    bright = land(root, "bright", brightness(0.3))
    unlabelled = land(root, "bright-unlabelled", brightness(0.3), labelled=False)
    bright_digest = tree_digest(bright)
    overrides = {"drift.cooldown_hours": 0}

    # Two checks at once: the second finds the landing area locked and does nothing.
    with file_lock(root / "data" / "landing" / ".drift-check.lock", wait=False):
        assert drift_check_flow(root=str(root), settle_seconds=0)["status"].startswith("skipped")
    assert bright.is_dir() and quiet.is_dir()

    # A check that fails midway (training crashes) leaves the batch in the landing area.
    def crash(**_):
        raise RuntimeError("worker lost")

    # Its own patch context: monkeypatch.undo() would also undo the autouse fixture's removal of
    # MLFLOW_TRACKING_URI, and a value left in this worker's environment would then point the next
    # check at another store (it found "no champion" once under pytest-xdist).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retraining, "training_flow", crash)
        crashed = drift_check_flow(root=str(root), settle_seconds=0, overrides=overrides, return_state=True)
    assert crashed.is_failed() and "worker lost" in crashed.message
    assert bright.is_dir() and tree_digest(bright) == bright_digest
    # ...while the batches it finished with were moved aside: the unlabelled one kept for labelling.
    archive = root / "data" / "landing_archive"
    assert (archive / "awaiting_labels" / "bright-unlabelled").is_dir() and not unlabelled.exists()
    assert not json.loads((root / "reports/drift/quiet.json").read_text())["drift"]
    assert (archive / "processed" / "quiet").is_dir() and not quiet.exists()
    alerts = flow_run_artifacts(crashed.state_details.flow_run_id)
    assert (
        "drift-alert-bright-unlabelled" in alerts and "labelling" in alerts["drift-alert-bright-unlabelled"]
    )

    state = drift_check_flow(root=str(root), settle_seconds=0, overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert list(summary["batches"]) == ["bright"] and summary["batches"]["bright"].startswith("drift")
    assert "training" in summary, summary

    # The batch is versioned with DVC and is part of the training data now.
    assert (root / "data/batches/bright.dvc").is_file()
    manifest = (root / "data/manifest.csv").read_text()
    assert manifest.count("bright__") == 90 and "quiet__" not in manifest
    assert "up to date" in sh(root, "dvc", "status")

    # The retrained model saw the brightened digits; the champion never did. On a test split that
    # now holds some of them (stable splits: the new images are assigned among themselves) the
    # candidate must beat the champion, pass the gate and be promoted: this case retrains *and* promotes.
    gate = json.loads((root / "reports/gate.json").read_text())
    assert gate["passed"], gate
    champion_check = gate["checks"]["no_regression_vs_champion"]
    assert champion_check["value"] > 0, champion_check  # candidate - champion accuracy: strictly better
    assert champion_check["status"] == "passed" and gate["champion_version"] == str(first.version), (
        champion_check
    )
    versions = client.search_model_versions("name = 'flow-test'")
    assert len(versions) == registered + 1
    champion = client.get_model_version_by_alias("flow-test", "champion")
    assert champion.version != first.version and "new champion" in summary["training"], summary
    split_report = json.loads((root / "reports/split.json").read_text())
    assert split_report["new_images"] == 90 and split_report["moved_images"] == 0

    # Nothing is lost: every batch moved aside whole, none left in the landing area.
    assert tree_digest(archive / "processed" / "bright") == bright_digest
    assert not [p for p in (root / "data" / "landing").iterdir() if not p.name.startswith(".")]

    # Every check is reported: JSON with every detector, HTML, an MLflow monitoring run, an artifact.
    report = json.loads((root / "reports/drift/bright.json").read_text())
    assert report["drift"] and {d["name"] for d in report["detectors"]} == {
        "image_stats",
        "embeddings",
        "softmax",
        "predicted_labels",
        "true_labels",
        "accuracy",
    }
    assert "<img src='data:image/png;base64," in (root / "reports/drift/bright.html").read_text()
    tracking.configure(cfg.mlflow, root)
    runs = mlflow.search_runs(
        experiment_names=["image-classification-drift-monitoring"], output_format="list"
    )
    assert {r.data.tags["batch"] for r in runs} >= {"quiet", "bright", "bright-unlabelled"}
    assert any("image_stats.brightness.p_value" in r.data.metrics for r in runs)
    published = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"drift-bright", "drift-check-summary"} <= set(published)
