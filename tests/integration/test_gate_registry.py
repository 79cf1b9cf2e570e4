"""The gate against a real MLflow registry: a weak model is refused and the champion does not move."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline import baseline, evaluate, export, gate, ingest, register, split, train, validate
from pipeline.errors import GateFailed
from pipeline.registry import rollback
from tests.conftest import FAST_RECIPE, digit_images, write_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def train_and_register(make_config, overrides: dict):
    """train -> evaluate -> export -> gate -> register on the prepared splits."""
    cfg, paths = make_config(overrides)
    train.run(cfg, paths)
    evaluate.run(cfg, paths)
    export.run(cfg, paths)
    verdict = gate.run(cfg, paths)
    return cfg, paths, verdict


@pytest.fixture
def project(tmp_path, make_config):
    source = write_tree(tmp_path / "incoming", digit_images(per_class=40, classes=3))
    base = {
        "ingest": {"source": "folder", "folder": {"path": str(source)}},
        "validate": {"min_images_per_class": 5},
        "train": {"epochs": 15, "batch_size": 16, **FAST_RECIPE},
        "export": {"calibration_images": 20, "int8": "ptq", "onnx": False},  # the registry is under test
        "gate": {
            "min_accuracy": 0.8,
            "min_macro_f1": 0.8,
            "min_margin_over_baseline": -1.0,
            "max_int8_accuracy_drop": 0.1,
            # The registry's side of the gate is under test here, four times over; the serving smoke
            # test has its own tests (tests/integration/test_serving.py) and runs in the flow tests.
            "serving_smoke_test": False,
        },
        "mlflow": {"registered_model": "gate-test"},
    }
    cfg, paths = make_config(base)
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)
    baseline.run(cfg, paths)
    return base, paths


def champion(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_weak_model_is_refused_and_champion_stays(project, make_config):
    base, paths = project
    cfg, _, first = train_and_register(make_config, base)
    assert first.passed
    assert {c.name: c.status for c in first.checks}["no_regression_vs_champion"] == "skipped"
    assert register.run(cfg, paths).alias == "champion"
    assert champion("gate-test") == "1"
    # The versions the model needs are stated (pipeline/registry.log_and_register), one line each.
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/gate-test/1")).read_text().split()
    assert {line.split("==")[0] for line in requirements} == {"mlflow", "tensorflow", "keras", "numpy"}
    assert f"mlflow=={mlflow.__version__}" in requirements

    weak = {**base, "train": {"epochs": 1, "learning_rate": 1e-7, "batch_size": 16, **FAST_RECIPE}}
    cfg, _, verdict = train_and_register(make_config, weak)
    failed = {c.name for c in verdict.failed}
    assert {"min_accuracy", "no_regression_vs_champion"} <= failed
    with pytest.raises(
        GateFailed, match=r"version 2 is 'challenger'.*champion' stays at version 1.*min_accuracy"
    ):
        register.run(cfg, paths)
    client = mlflow.MlflowClient()
    assert champion("gate-test") == "1"
    assert str(client.get_model_version_by_alias("gate-test", "challenger").version) == "2"
    assert client.get_model_version("gate-test", "2").tags["gate.passed"] == "False"
    assert '"passed": false' in paths.gate_report.read_text()

    retrained = {**base, "train": {**base["train"], "seed": 7}}
    cfg, _, verdict = train_and_register(make_config, retrained)
    assert verdict.passed
    assert {c.name: c.status for c in verdict.checks}["no_regression_vs_champion"] == "passed"
    assert register.run(cfg, paths).previous_champion == "1"
    assert champion("gate-test") == "3"

    assert rollback(cfg.mlflow, paths.root) == ("3", "1")
    assert champion("gate-test") == "1"
    loaded = mlflow.tensorflow.load_model("models:/gate-test@champion")
    assert loaded.output_shape == (None, 3)
