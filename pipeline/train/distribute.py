"""Distribution strategy, mixed precision and the worker's role, from params and TF_CONFIG.

The same params.yaml carries a run from a laptop CPU (one device) to a
machine with several GPUs (MirroredStrategy) to several machines
(MultiWorkerMirroredStrategy driven by TF_CONFIG, as Kubeflow's TFJob and
`python -m pipeline train --workers N` set it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def tf_config() -> dict[str, Any]:
    """The parsed TF_CONFIG environment variable ({} when unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw))
    except json.JSONDecodeError as error:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({error}); see infra/README.md") from None


def cluster_size(config: dict[str, Any]) -> int:
    """Chief plus worker tasks in TF_CONFIG's cluster (1 without a cluster)."""
    cluster = config.get("cluster", {})
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def is_chief(config: dict[str, Any] | None = None) -> bool:
    """The task that writes checkpoints, the model, reports and MLflow records.

    The `chief` task when the cluster has one (TFJob), else worker 0; a
    single process is always chief.
    """
    config = tf_config() if config is None else config
    task = config.get("task", {})
    if not task:
        return True
    if "chief" in config.get("cluster", {}):
        return bool(task.get("type") == "chief")
    return bool(task.get("type") == "worker" and int(task.get("index", 0)) == 0)


def worker_id(config: dict[str, Any] | None = None) -> str:
    """`chief`, or `<type>-<index>` (names per-worker scratch folders)."""
    config = tf_config() if config is None else config
    task = config.get("task", {})
    return "chief" if is_chief(config) else f"{task.get('type', 'worker')}-{task.get('index', 0)}"


def choose_strategy(cfg: TrainConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `train.distribution`.

    `auto`: MultiWorkerMirroredStrategy when TF_CONFIG names several tasks,
    MirroredStrategy over all GPUs when there are several, else one device
    (`one_device`: TensorFlow's default strategy on the first GPU or the CPU).
    `mirrored` without GPUs mirrors over the logical CPU devices (how the
    tests run it on CPU).

    Raises:
        ConfigError: `multi_worker` without a TF_CONFIG cluster.
    """
    # Physical devices only until the strategy exists: listing logical devices starts the TF
    # runtime, after which a multi-worker strategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")
    choice = cfg.distribution
    if choice == "auto":
        if cluster_size(tf_config()) > 1:
            choice = "multi_worker"
        else:
            choice = "mirrored" if len(gpus) > 1 else "one_device"
    if choice == "multi_worker":
        if cluster_size(tf_config()) < 2:
            raise ConfigError(
                "train.distribution: multi_worker needs TF_CONFIG with at least two tasks; "
                "use `python -m pipeline train --workers N` locally, or a TFJob (infra/k8s/)"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if choice == "mirrored":
        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in logical])
    # One device: TensorFlow's default strategy (the first GPU, else the CPU). OneDeviceStrategy
    # does the same work through distributed iterators that cost about a sixth of a small
    # training run on the CPU (profiled: 7 s of 44 for 600 steps) and buy nothing on one device.
    return tf.distribute.get_strategy()


def scaled_learning_rate(learning_rate: float, replicas: int, rule: str) -> float:
    """The learning rate for `replicas` replicas: `none`, `linear` (x replicas) or `sqrt`."""
    if rule == "linear":
        return learning_rate * replicas
    if rule == "sqrt":
        return learning_rate * math.sqrt(replicas)
    return learning_rate


def gpu_compute_capability() -> tuple[int, int] | None:
    """The lowest compute capability among visible GPUs, or None without GPUs."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if "compute_capability" in details:
            capabilities.append(tuple(details["compute_capability"]))
    return min(capabilities) if capabilities else None  # type: ignore[return-value]


def precision_policy(setting: str, capability: tuple[int, int] | None) -> str:
    """The Keras dtype policy for `train.mixed_precision` on this hardware.

    `auto` turns mixed precision on only on GPUs with tensor cores:
    bfloat16 from compute capability 8.0 (Ampere and later: float32's range,
    no loss scaling), float16 on 7.x (Volta, Turing). `on` forces it: the
    same choice on a GPU, bfloat16 on a CPU. `off` is float32.
    """
    if setting == "off":
        return "float32"
    if capability is None:
        return "mixed_bfloat16" if setting == "on" else "float32"
    if capability >= (8, 0):
        return "mixed_bfloat16"
    if capability >= (7, 0) or setting == "on":
        return "mixed_float16"
    return "float32"


@dataclass(frozen=True)
class Distribution:
    """What a training process runs with."""

    strategy: tf.distribute.Strategy
    replicas: int
    global_batch_size: int
    learning_rate: float
    fine_tune_learning_rate: float
    precision: str
    chief: bool
    worker: str

    @property
    def strategy_name(self) -> str:
        """The strategy's name for MLflow tags: the public tf.distribute class name, or `DefaultStrategy`.

        `DefaultStrategy` is TensorFlow's default (no-op) strategy that `one_device` uses; its class
        is private, so it is named here. MultiWorkerMirroredStrategy's class also has another name.
        """
        for public in ("MultiWorkerMirroredStrategy", "MirroredStrategy", "OneDeviceStrategy"):
            if isinstance(self.strategy, getattr(tf.distribute, public)):
                return public
        if type(self.strategy).__name__ == "_DefaultDistributionStrategy":
            return "DefaultStrategy"  # one device, no distribution wrapper (tf.distribute.get_strategy())
        return type(self.strategy).__name__

    @property
    def multi_worker(self) -> bool:
        return isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def describe(self) -> dict[str, str]:
        """MLflow tags: what this run actually used."""
        return {
            "distribution.strategy": self.strategy_name,
            "distribution.replicas": str(self.replicas),
            "distribution.global_batch_size": str(self.global_batch_size),
            "mixed_precision.policy": self.precision,
        }


def setup(cfg: TrainConfig) -> Distribution:
    """Pick the strategy and dtype policy (set globally for the models built next).

    The strategy must exist before any other TensorFlow work in a multi-worker
    process, so call this first.
    """
    import keras

    strategy = choose_strategy(cfg)
    replicas = int(strategy.num_replicas_in_sync)
    precision = precision_policy(cfg.mixed_precision, gpu_compute_capability())
    keras.mixed_precision.set_global_policy(precision)
    distribution = Distribution(
        strategy=strategy,
        replicas=replicas,
        global_batch_size=cfg.batch_size * replicas,
        learning_rate=scaled_learning_rate(cfg.learning_rate, replicas, cfg.lr_scaling),
        fine_tune_learning_rate=scaled_learning_rate(cfg.fine_tune.learning_rate, replicas, cfg.lr_scaling),
        precision=precision,
        chief=is_chief(),
        worker=worker_id(),
    )
    log.info(
        "%s with %d replica(s), global batch up to %d, peak learning rate %g (%s scaling), "
        "dtype policy %s, %s",
        distribution.strategy_name,
        replicas,
        distribution.global_batch_size,
        distribution.learning_rate,
        cfg.lr_scaling,
        precision,
        distribution.worker,
    )
    return distribution


def distribute_options() -> tf.data.Options:
    """Input sharding for several workers: by data (DATA policy).

    The datasets are built from a list of file paths, not from files tf.data
    reads itself, so FILE sharding does not apply; with DATA each worker keeps
    its share of every global batch, and uneven ends are synchronised by the
    strategy.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
