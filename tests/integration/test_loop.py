"""The closed loop end to end, with real processes: served traffic -> log -> landing batches -> drift check
-> DVC -> retraining -> gate -> registry -> the running service.

One small digits project is trained once (training flow on a temporary Prefect
server); `flows.loop_demo.story` (what `make loop-demo` runs) starts the real
service on it, sends traffic and feedback over HTTP, and runs the drift-check
flow. Clean traffic comes first and must change nothing; shifted traffic then
must retrain, promote, and reach the running service.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.loop_demo import story
from flows.training import training_flow
from pipeline import tracking
from pipeline.config import load_config
from pipeline.monitoring.landing import read_batch
from pipeline.monitoring.shifts import brightness, unchanged
from tests.conftest import digit_images, sh, write_tree
from tests.integration.test_flows import small_project
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits project (3 classes x 40 images) after one training flow: v1 is champion."""
    root = small_project(tmp_path_factory.mktemp("loop") / "project")
    # Module fixtures run before the autouse one that unsets MLFLOW_TRACKING_URI; a value another
    # module left in this worker's environment would send the registration to another store.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        training_flow(root=str(root))
    return root


def fresh_digits(root: Path, start: int, stop: int) -> tuple[list[Path], list[str]]:
    """Digits the project never trained on (images start..stop-1 of each class) and their labels."""
    chosen = {label: images[start:stop] for label, images in digit_images(per_class=stop).items()}
    folder = write_tree(root.parent / f"traffic-{start}-{stop}", chosen)
    files = sorted(folder.rglob("*.png"))
    return files, [path.parent.name for path in files]


def registry(root: Path) -> mlflow.MlflowClient:
    tracking.configure(load_config(root / "params.yaml", root).mlflow, root)
    return mlflow.MlflowClient()


def log_records(root: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((root / "data/served/log").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_clean_traffic_is_cut_into_batches_that_do_not_alarm_or_retrain(project: Path):
    champion = str(registry(project).get_model_version_by_alias("flow-test", "champion").version)
    told: list[str] = []
    result = story(
        project,
        fresh_digits(project, 40, 80),  # 120 unshifted images
        ([], []),
        unchanged(),
        port=free_port(),
        batch_images=60,
        label_share=0.5,
        say=told.append,
    )
    assert len(result["answers"]) == 120 and {a.version for a in result["answers"]} == {champion}
    assert len(result["served_batches"]) == 2 and len(result["feedback_batches"]) == 1, told
    summary = result["drift"]
    assert set(summary["batches"]) == {*result["served_batches"], *result["feedback_batches"]}, summary
    assert all(outcome == "no drift" for outcome in summary["batches"].values()), summary
    assert "training" not in summary and summary["decision"].startswith("no drift"), summary
    assert str(registry(project).get_model_version_by_alias("flow-test", "champion").version) == champion
    assert len(registry(project).search_model_versions("name = 'flow-test'")) == 1
    archive = project / "data/landing_archive/processed"
    assert {p.name for p in archive.iterdir()} >= set(summary["batches"])
    # The labelled batch holds what the feedback said, under each class.
    (labelled,) = result["feedback_batches"]
    batch = read_batch(archive / labelled)
    truths = {a.id: a.truth for a in result["answers"]}
    feedback = {(r["id"], r["label"]) for r in log_records(project) if r["kind"] == "feedback"}
    assert batch.labelled and len(batch.files) == 60 and {(i, truths[i]) for i, _ in feedback} == feedback
    # The drift check's MLflow runs carry the live figures for each batch.
    runs = mlflow.search_runs(
        experiment_names=["image-classification-drift-monitoring"], output_format="list"
    )
    by_batch = {r.data.tags["batch"]: r.data.metrics for r in runs}
    assert 0.5 < by_batch[labelled]["quality.accuracy"] <= 1.0
    assert "quality.mean_confidence" in by_batch[result["served_batches"][0]]
    assert "quality.training_class_share.2" in by_batch[labelled]


def test_shifted_traffic_retrains_promotes_and_the_running_service_answers_better(project: Path):
    client = registry(project)
    old = str(client.get_model_version_by_alias("flow-test", "champion").version)
    told: list[str] = []
    result = story(
        project,
        fresh_digits(project, 80, 130),  # 150 images, brightness +0.3: the traffic that drifted
        fresh_digits(project, 130, 160),  # 90 more, shifted the same way, after the retraining
        brightness(0.3),
        port=free_port(),
        batch_images=50,
        say=told.append,
        log_dir=project / "data/served-shifted",  # live figures of this traffic only, not the clean test's
    )
    text = "\n".join(told)
    summary = result["drift"]
    # The served batches are flagged (and kept for labelling); the labelled ones are trained on.
    assert len(result["served_batches"]) == 3 and len(result["feedback_batches"]) == 2, text
    for name in result["served_batches"]:
        assert summary["batches"][name].startswith("drift") and "awaiting labels" in summary["batches"][name]
    for name in result["feedback_batches"]:
        assert summary["batches"][name].startswith("drift"), summary
        assert (project / f"data/batches/{name}.dvc").is_file()
    assert "new champion" in summary["training"], text
    assert "up to date" in sh(project, "dvc", "status")

    # The promotion reached the running service: it answers with the new version, and better.
    new = result["new_version"]
    assert new is not None and new != old, text
    assert str(client.get_model_version_by_alias("flow-test", "champion").version) == new
    assert {a.version for a in result["later_answers"]} == {new}
    figures = result["monitoring"]
    assert figures[old]["labelled"] == 100 and figures[new]["labelled"] == 90, figures
    assert figures[new]["accuracy"] > figures[old]["accuracy"], text
    assert "6. the service switched by itself" in text and "live accuracy" in text
