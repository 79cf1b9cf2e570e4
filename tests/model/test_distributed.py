"""Distributed training on CPU: MirroredStrategy over logical devices, two local workers, mixed precision."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import keras
import mlflow
import pandas as pd
import pytest

from pipeline import ingest, split, tracking, train, validate
from pipeline.config import load_config
from pipeline.paths import StagePaths
from tests.conftest import sh
from tests.integration.test_flows import small_project

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("distributed_job.py")


def project(tmp_path: Path, **train_params) -> Path:
    """A small project with its data stages run, ready to train."""
    root = small_project(tmp_path / "project", per_class=40)
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update({"epochs": 8, "lr_scaling": "none", **train_params})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml", root)
    paths = StagePaths.from_config(cfg.paths, root)
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)
    return root


def runs(root: Path) -> list:
    cfg = load_config(root / "params.yaml", root)
    tracking.configure(cfg.mlflow, root)
    return mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")


def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path: Path):
    root = project(tmp_path, batch_size=8, distribution="one_device")
    sh(root, sys.executable, str(JOB), str(root), "2")
    single = pd.read_csv(root / "reports/train_history.csv")

    params = (root / "params.yaml").read_text()
    params = params.replace("distribution: one_device", "distribution: mirrored")
    (root / "params.yaml").write_text(params.replace("batch_size: 8", "batch_size: 4"))  # same global batch
    sh(root, sys.executable, str(JOB), str(root), "2")
    mirrored = pd.read_csv(root / "reports/train_history.csv")

    tags = {r.data.tags["distribution.strategy"]: r.data.tags for r in runs(root)}
    assert set(tags) == {"DefaultStrategy", "MirroredStrategy"}
    assert tags["MirroredStrategy"]["distribution.replicas"] == "2"
    assert tags["MirroredStrategy"]["distribution.global_batch_size"] == "8"
    print(single[["loss", "val_accuracy"]].tail(2), mirrored[["loss", "val_accuracy"]].tail(2))
    assert len(single) == len(mirrored) == 8
    # Same data, seed and global batch; only the reduction order and per-replica BatchNorm differ.
    assert abs(single["loss"].iloc[-1] - mirrored["loss"].iloc[-1]) < 0.15
    assert abs(single["val_accuracy"].iloc[-1] - mirrored["val_accuracy"].iloc[-1]) <= 0.1
    assert mirrored["val_accuracy"].iloc[-1] > 0.8


def test_two_local_workers_agree_and_only_the_chief_writes(tmp_path: Path):
    root = project(tmp_path, batch_size=4)
    output = sh(root, sys.executable, "-m", "pipeline", "train", "--workers", "2")
    found = re.findall(r"final weights sha256 ([0-9a-f]{64}) \((\S+)\)", output)
    digests = {worker: digest for digest, worker in found}
    assert set(digests) == {"chief", "worker-1"}, output[-3000:]
    assert digests["chief"] == digests["worker-1"]

    recorded = runs(root)
    assert len(recorded) == 1  # the chief's run, and only it
    tags = recorded[0].data.tags
    assert tags["distribution.strategy"] == "MultiWorkerMirroredStrategy"
    assert tags["distribution.replicas"] == "2" and tags["distribution.global_batch_size"] == "8"
    history = mlflow.MlflowClient().get_metric_history(recorded[0].info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(8))  # one value per epoch, logged once (chief)
    assert (root / "models/keras/model.keras").is_file()
    assert not list((root / ".cache").rglob("workers"))  # the worker's scratch state is gone
    assert (root / "reports/tensorboard").is_dir() and not list((root / "reports").rglob("*worker*"))


def test_training_with_mixed_precision_forced_on_cpu(tmp_path: Path):
    root = project(tmp_path, batch_size=16, mixed_precision="on", epochs=3)
    cfg = load_config(root / "params.yaml", root)
    try:
        result = train.run(cfg, StagePaths.from_config(cfg.paths, root))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert runs(root)[0].data.tags["mixed_precision.policy"] == "mixed_bfloat16"
    history = pd.read_csv(root / "reports/train_history.csv")
    assert history["loss"].notna().all() and history["loss"].iloc[-1] < history["loss"].iloc[0]
    saved = keras.models.load_model(result.model_path)
    assert saved.dtype_policy.name == "float32"  # saved as float32, so evaluate and export are unchanged
    assert saved.get_layer("probabilities").dtype_policy.name == "float32"
