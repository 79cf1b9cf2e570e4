"""Transfer learning on a MobileNetV2 base whose weights come from a file, not from the network.

The test writes its own base weights (random but distinctive: seeded and then
perturbed, so they match nothing the pipeline could build by itself), trains
one head epoch and one fine-tuning epoch with the top 10 base layers unfrozen,
and checks what moved and what did not in the saved model.
"""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import train
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT
from tests.model.conftest import local_tracking

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
FINE_TUNE_LAYERS = 10


def distinctive_base_weights(target: Path) -> dict[str, list[np.ndarray]]:
    """Save MobileNetV2 base weights nobody else has; returns them by layer name."""
    keras.utils.set_random_seed(123)
    base = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    rng = np.random.default_rng(7)
    for layer in base.layers:
        values = []
        for variable, value in zip(layer.weights, layer.get_weights(), strict=True):
            if variable.path.endswith(("gamma", "moving_variance")):  # must stay positive
                value = rng.uniform(0.5, 1.5, value.shape)
            else:
                value = value + rng.normal(0.0, 0.05, value.shape)
            values.append(value.astype(np.float32))
        layer.set_weights(values)
    base.save_weights(target)
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.layers if layer.weights}


def nested_base(model: keras.Model) -> keras.Model:
    (base,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return base


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_mobilenet_v2_from_a_weights_file_trains_head_then_fine_tunes(project_copy, tmp_path: Path) -> None:
    weights_file = tmp_path / "base.weights.h5"
    expected = distinctive_base_weights(weights_file)
    project = project_copy(
        {
            "train": {
                "model": "mobilenet_v2",
                "weights": str(weights_file),
                "image_size": IMAGE_SIZE,
                "epochs": 1,
                "fine_tune": {"epochs": 1, "layers": FINE_TUNE_LAYERS, "learning_rate": 0.001},
            }
        }
    )
    paths = project.paths
    with local_tracking():
        result = train.run(project.cfg, paths)

    assert not result.resumed
    assert result.epochs == 2
    history = pd.read_csv(paths.train_history)
    assert history[["epoch", "phase"]].values.tolist() == [[1, "head"], [2, "fine_tune"]]
    assert not any(paths.train_backup.iterdir()), "the finished job's backup should be gone"

    model = keras.models.load_model(paths.keras_model)
    base = nested_base(model)
    top = base.layers[-FINE_TUNE_LAYERS:]
    below = [layer for layer in base.layers[:-FINE_TUNE_LAYERS] if layer.weights]
    assert set(expected) == {layer.name for layer in base.layers if layer.weights}

    # Everything below the fine-tuned top is exactly the file's weights: the base
    # was loaded from it, stayed frozen in the head phase and was not unfrozen later.
    changed_below = [layer.name for layer in below if not same(layer.get_weights(), expected[layer.name])]
    assert changed_below == []
    assert same(base.get_layer("Conv1").get_weights(), expected["Conv1"])

    # BatchNorm stays frozen (and in inference mode) also inside the unfrozen top:
    # neither gamma/beta nor the moving statistics moved.
    top_batch_norm = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
    assert top_batch_norm
    for layer in top_batch_norm:
        assert same(layer.get_weights(), expected[layer.name]), layer.name

    # The unfrozen convolutions of the top were fine-tuned.
    top_conv = [
        layer for layer in top if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert {layer.name for layer in top_conv} >= {"Conv_1", "block_16_project"}
    for layer in top_conv:
        assert not same(layer.get_weights(), expected[layer.name]), f"{layer.name} did not change"

    run = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.tags["weights_source"] == str(weights_file)
    assert run.data.params["train.weights"] == str(weights_file)


def write_params(folder: Path, train_overrides: dict) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"].update(train_overrides)
    target = folder / "params.yaml"
    target.write_text(yaml.safe_dump(params))
    return target


def test_missing_weights_file_is_a_config_error(tmp_path: Path) -> None:
    params = write_params(tmp_path, {"model": "mobilenet_v2", "weights": "no/such/file.h5"})
    with pytest.raises(ConfigError, match=r"train\.weights: .*no/such/file\.h5 is not a file"):
        load_config(params)


def test_existing_weights_file_relative_to_the_params_folder_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "base.weights.h5").write_bytes(b"")
    params = write_params(tmp_path, {"model": "mobilenet_v2", "weights": "weights/base.weights.h5"})
    assert load_config(params).train.weights == "weights/base.weights.h5"
