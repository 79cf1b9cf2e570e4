"""The step-counted recipe: what the defaults decide for datasets of different sizes (pure, no training)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pipeline.config import TrainConfig, parse_config
from pipeline.errors import PipelineError
from pipeline.train.recipe import plan, short_sides
from tests.conftest import REPO_ROOT


def committed() -> TrainConfig:
    return parse_config(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())).train


def recipe_for(images: int, side: int, cfg: TrainConfig | None = None, replicas: int = 1):
    return plan(cfg or committed(), pd.Series([side] * images), replicas, 1e-3, 1e-5)


def test_a_small_folder_gets_a_small_batch_and_the_step_floor():
    recipe = recipe_for(168, 150)  # the folder that failed with the epoch-counted recipe
    assert recipe.batch_size == 16  # 64 would make 3 steps a pass
    assert recipe.steps_per_epoch == 20  # 11 batches a pass, repeated to the floor
    assert recipe.first.steps >= 600 and recipe.first.start_from_epoch * recipe.steps_per_epoch >= 600
    assert recipe.first.warmup_steps == 30
    assert recipe.image_size == 64  # 150-px images are not squeezed to 32


def test_the_digits_keep_their_batch_and_size():
    recipe = recipe_for(1257, 8)
    assert (recipe.batch_size, recipe.image_size, recipe.steps_per_epoch) == (64, 32, 20)
    assert recipe.first.steps == 600


def test_a_large_folder_is_capped_in_steps_not_days():
    recipe = recipe_for(100_000, 400)
    assert recipe.batch_size == 64 and recipe.steps_per_epoch == 1563
    assert committed().max_steps - recipe.steps_per_epoch < recipe.first.steps <= committed().max_steps
    assert recipe.first.epochs < 30


def test_replicas_share_the_steps_of_one_global_batch():
    recipe = recipe_for(168, 150, replicas=2)
    assert recipe.global_batch_size == 2 * recipe.batch_size == 32


@pytest.mark.parametrize(
    ("model", "side", "expected"),
    [("small_cnn", 8, 32), ("small_cnn", 47, 48), ("small_cnn", 500, 64), ("mobilenet_v2", 150, 160),
     ("mobilenet_v2", 8, 96), ("efficientnet_b0", 2000, 224)],
)  # fmt: skip
def test_auto_image_size_follows_the_median_short_side_within_the_models_range(model, side, expected):
    assert recipe_for(200, side, committed().model_copy(update={"model": model})).image_size == expected


def test_a_fixed_image_size_is_kept():
    assert recipe_for(200, 150, committed().model_copy(update={"image_size": 40})).image_size == 40


def test_short_sides_come_from_the_manifest_and_a_stray_path_is_named():
    manifest = pd.DataFrame({"path": ["a.png", "b.png"], "width": [30, 100], "height": [50, 80]})
    assert short_sides(pd.DataFrame({"path": ["b.png", "a.png"]}), manifest).tolist() == [80, 30]
    with pytest.raises(PipelineError, match="c.png: in the split but not in the manifest"):
        short_sides(pd.DataFrame({"path": ["c.png"]}), manifest)


def test_a_model_near_chance_is_reported_as_not_learned_with_advice():
    from pipeline.train import learning_report

    val = pd.DataFrame({"label": ["a", "b", "c", "d"] * 12})
    recipe = recipe_for(168, 150)
    flat = learning_report(pd.DataFrame({"val_accuracy": [0.25, 0.27, 0.31]}), val, recipe)
    assert not flat["learned"] and flat["chance_val_accuracy"] == 0.25 and flat["steps_run"] == 60
    assert any("mobilenet_v2" in advice for advice in flat["advice"])
    good = learning_report(pd.DataFrame({"val_accuracy": [0.4, 0.9]}), val, recipe)
    assert good["learned"] and "advice" not in good
