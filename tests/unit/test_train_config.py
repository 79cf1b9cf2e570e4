import pandas as pd
import pytest

from pipeline.config import ConfigError, TrainConfig, parse_config, with_overrides
from pipeline.train.phases import class_weights, warn_class_weights_dropped


def frame(counts: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame({"label": [label for label, n in counts.items() for _ in range(n)]})


def test_auto_class_weights_only_when_imbalanced():
    names = ["a", "b"]
    assert class_weights(frame({"a": 50, "b": 45}), names, TrainConfig()) is None
    weights = class_weights(frame({"a": 90, "b": 10}), names, TrainConfig())
    assert weights == pytest.approx({0: 100 / (2 * 90), 1: 100 / (2 * 10)})


def test_class_weights_are_dropped_with_a_warning_while_distilling(caplog: pytest.LogCaptureFixture):
    weights = class_weights(frame({"a": 90, "b": 10}), ["a", "b"], TrainConfig())
    assert weights is not None
    with caplog.at_level("WARNING", logger="pipeline.train.phases"):
        warn_class_weights_dropped(weights)
    assert "2 class weights are not applied while distilling" in caplog.text
    assert "train.distill: null" in caplog.text
    caplog.clear()
    warn_class_weights_dropped(None)
    assert not caplog.text


def test_class_weights_can_be_forced_or_disabled():
    names = ["a", "b"]
    assert class_weights(frame({"a": 50, "b": 50}), names, TrainConfig(class_weights="balanced")) == {
        0: 1.0,
        1: 1.0,
    }
    assert class_weights(frame({"a": 90, "b": 10}), names, TrainConfig(class_weights="none")) is None


def test_transfer_models_need_32_pixels():
    with pytest.raises(ConfigError, match="train: image_size: mobilenet_v2 needs at least 32 pixels, got 16"):
        parse_config({"train": {"model": "mobilenet_v2", "image_size": 16}})


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(ConfigError, match="small_cnn has no pretrained weights"):
        parse_config({"train": {"weights": "imagenet"}})


def test_overrides_replace_dotted_keys_and_reject_unknown_ones():
    raw = {"train": {"epochs": 30, "augment": {"zoom": 0.1}}}
    assert with_overrides(raw, {"train.epochs": 3, "train.augment.zoom": 0.0}) == {
        "train": {"epochs": 3, "augment": {"zoom": 0.0}}
    }
    assert raw["train"]["epochs"] == 30
    with pytest.raises(ConfigError, match="override train.epochz: unknown key 'epochz'"):
        with_overrides(raw, {"train.epochz": 3})
    with pytest.raises(ConfigError, match="override train.epochs.x: 'epochs' is not a params section"):
        with_overrides(raw, {"train.epochs.x": 3})
