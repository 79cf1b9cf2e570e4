"""Strategy choice, the chief, learning-rate scaling and the mixed-precision policy, without training."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.train import distribute
from pipeline.train.launch import worker_configs

CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def test_worker_zero_is_chief_unless_the_cluster_has_a_chief():
    assert distribute.is_chief({})
    assert distribute.is_chief({"cluster": CLUSTER, "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": CLUSTER, "task": {"type": "worker", "index": 1}})
    tfjob = {"cluster": {"chief": ["c:1"], **CLUSTER}, "task": {"type": "worker", "index": 0}}
    assert not distribute.is_chief(tfjob)
    assert distribute.is_chief({**tfjob, "task": {"type": "chief", "index": 0}})
    assert distribute.worker_id(tfjob) == "worker-0"


def test_the_launcher_gives_each_worker_its_own_task():
    configs = [json.loads(c) for c in worker_configs(3, [5001, 5002, 5003])]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert configs[0]["cluster"] == {"worker": ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]}


def test_learning_rate_scaling_rules():
    assert distribute.scaled_learning_rate(0.001, 4, "none") == 0.001
    assert distribute.scaled_learning_rate(0.001, 4, "linear") == pytest.approx(0.004)
    assert distribute.scaled_learning_rate(0.001, 4, "sqrt") == pytest.approx(0.002)


@pytest.mark.parametrize(
    "setting, capability, policy",
    [
        ("auto", None, "float32"),  # CPU: mixed precision only slows it down
        ("on", None, "mixed_bfloat16"),  # forced on a CPU
        ("auto", (8, 0), "mixed_bfloat16"),  # A100, H100: bfloat16, no loss scaling
        ("auto", (7, 5), "mixed_float16"),  # T4: tensor cores, float16
        ("auto", (6, 1), "float32"),  # Pascal: no tensor cores
        ("on", (6, 1), "mixed_float16"),
        ("off", (9, 0), "float32"),
    ],
)
def test_precision_policy(setting, capability, policy):
    assert distribute.precision_policy(setting, capability) == policy


def test_auto_on_this_cpu_is_one_device_and_float32(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    dist = distribute.setup(TrainConfig(batch_size=16))
    assert dist.strategy_name == "DefaultStrategy" and dist.strategy is tf.distribute.get_strategy()
    assert dist.replicas == 1 and dist.global_batch_size == 16 and dist.precision == "float32"
    assert dist.chief


def test_multi_worker_without_a_cluster_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.choose_strategy(TrainConfig(distribution="multi_worker"))
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        distribute.tf_config()
