"""Fixed seeds: the same data and params train the same weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline import ingest, split, train, validate
from tests.conftest import FAST_RECIPE, digit_images, write_tree

pytestmark = pytest.mark.slow


def test_training_twice_gives_identical_weights(tmp_path, make_config):
    source = write_tree(tmp_path / "incoming", digit_images(per_class=20, classes=3))
    cfg, paths = make_config(
        {
            "ingest": {"source": "folder", "folder": {"path": str(source)}},
            "validate": {"min_images_per_class": 5},
            "train": {"epochs": 2, "batch_size": 16, **FAST_RECIPE},
        }
    )
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)

    results, weights = [], []
    for _ in range(2):
        results.append(train.run(cfg, paths))
        weights.append(keras.models.load_model(paths.keras_model).get_weights())
    # Both trained from scratch in runs of their own: a second run resumed from the first's backup
    # would reload the first's weights and match them trivially.
    assert not any(result.resumed for result in results) and results[0].run_id != results[1].run_id
    assert weights[0] and all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
