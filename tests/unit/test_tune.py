"""The tuning pieces that need no training: the tune section, a trial's train section, the study's total."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.config import ConfigError, parse_config
from pipeline.tracking import flat_params
from pipeline.tune.study import is_surplus, masked, study_is_done
from pipeline.tune.trial import suggest, trial_config
from tests.unit.test_config import params


def tune_params(**tune: object) -> dict:
    raw = params()
    raw["tune"].update(tune)
    return raw


def test_the_search_space_is_checked_against_the_train_section():
    with pytest.raises(ConfigError, match=r"tune\.space\.dropout: 1\.5 is not a valid train value"):
        parse_config(tune_params(space={"dropout": [0.0, 1.5]}))
    with pytest.raises(
        ConfigError, match=r"tune\.space\.learning_rate: a log-scale range must start above 0"
    ):
        parse_config(tune_params(space={"learning_rate": [0.0, 0.1]}))
    with pytest.raises(ConfigError, match=r"tune\.space\.batch_size: batch sizes must be powers of two"):
        parse_config(tune_params(space={"batch_size": [16, 24]}))
    with pytest.raises(ConfigError, match=r"tune\.space\.zoom: low 0\.3 exceeds high 0\.1"):
        parse_config(tune_params(space={"zoom": [0.3, 0.1]}))
    with pytest.raises(ConfigError, match=r"tune: grace_seconds \(30\) must exceed heartbeat_seconds"):
        parse_config(tune_params(heartbeat_seconds=60, grace_seconds=30))
    assert parse_config(tune_params(space={"rotation": None})).tune.space.rotation is None


def test_the_storage_comes_from_the_environment_and_its_password_is_never_shown(monkeypatch):
    monkeypatch.setenv("PIPELINE_TUNE_STORAGE", "postgresql://tuner:s3cret@db.example:5432/optuna")
    cfg = parse_config(params())
    assert cfg.tune.storage == "postgresql://tuner:s3cret@db.example:5432/optuna"
    assert masked(cfg.tune.storage) == "postgresql://tuner:***@db.example:5432/optuna"
    assert flat_params(cfg)["tune.storage"] == "postgresql://tuner:***@db.example:5432/optuna"
    monkeypatch.setenv("PIPELINE_TUNE_STORAGE", "tuner:s3cret@db")
    with pytest.raises(ConfigError, match="PIPELINE_TUNE_STORAGE: is not a database URL") as raised:
        parse_config(params())
    assert "s3cret" not in str(raised.value)


def test_a_trial_sets_nested_knobs_and_caps_its_steps():
    train = parse_config(params()).train
    chosen = {"train.learning_rate": 0.002, "train.batch_size": 8, "train.augment.zoom": 0.05}
    trial = trial_config(train, chosen, max_steps=50)
    assert (trial.learning_rate, trial.batch_size, trial.augment.zoom) == (0.002, 8, 0.05)
    assert trial.min_batch_size == 8 <= train.min_batch_size  # never above the trial's batch
    assert trial.max_steps == 50 and trial.min_steps == min(train.min_steps, 50)
    assert trial.augment.translation == train.augment.translation and trial.fine_tune == train.fine_tune
    assert train.learning_rate != 0.002  # the base section is not changed


def test_the_knobs_searched_follow_the_model():
    space = parse_config(params()).tune.space
    values = {
        "train.learning_rate": 1e-3,
        "train.fine_tune.learning_rate": 1e-5,
        "train.batch_size": 16,
        "train.weight_decay": 1e-4,
        "train.dropout": 0.1,
        "train.width": 32,
        **{f"train.augment.{name}": 0.05 for name in ("zoom", "translation", "rotation", "contrast")},
    }
    cnn = suggest(optuna.trial.FixedTrial(values), space, "small_cnn")
    transfer = suggest(optuna.trial.FixedTrial(values), space, "mobilenet_v2")
    assert set(values) - set(cnn) == {"train.fine_tune.learning_rate"}
    assert set(values) - set(transfer) == {"train.width"}
    train = parse_config(params()).train.model_copy(update={"model": "mobilenet_v2"})
    assert trial_config(train, transfer, 100).fine_tune.learning_rate == 1e-5


def test_a_process_stops_at_the_total_and_a_late_trial_steps_aside(tmp_path: Path):
    cfg = parse_config(tune_params(trials=3, heartbeat_seconds=1, grace_seconds=2)).tune
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    for value in (0.5, 0.6):
        study.add_trial(optuna.create_trial(value=value, params={}, distributions={}))
    assert not study_is_done(study, cfg)
    first, second = study.ask(), study.ask()  # two processes start a trial at the same moment
    assert not is_surplus(first, cfg.trials) and is_surplus(second, cfg.trials)
    study.tell(second, state=TrialState.FAIL)
    study.tell(first, 0.7)
    assert study_is_done(study, cfg)
