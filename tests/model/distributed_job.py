"""Run the train stage in a fresh process with N logical CPU devices (what MirroredStrategy mirrors over).

Logical devices must be configured before TensorFlow initialises, hence a process of its own:

    python tests/model/distributed_job.py <project root> <logical CPUs>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tensorflow as tf


def main() -> None:
    root, devices = Path(sys.argv[1]), int(sys.argv[2])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)

    from pipeline import train
    from pipeline.config import load_config
    from pipeline.paths import StagePaths

    cfg = load_config(root / "params.yaml", root)
    result = train.run(cfg, StagePaths.from_config(cfg.paths, root))
    print(json.dumps({"run_id": result.run_id, "epochs": result.epochs}))


if __name__ == "__main__":
    main()
