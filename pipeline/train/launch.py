"""`python -m pipeline train --workers N`: N local training workers over loopback, for development.

Each worker is `python -m pipeline train` with its own TF_CONFIG (a cluster of
N workers on 127.0.0.1, worker 0 the chief), exactly what a TFJob gives the
pods of a cluster job. The launcher streams their logs, stops them all if one
fails, and checks that they finished with identical weights; if the launcher
itself is killed, the workers end too (pipeline/children.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline import children
from pipeline.errors import ConfigError, PipelineError

DIGEST = re.compile(r"final weights sha256 ([0-9a-f]{64}) \((\S+)\)")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_configs(count: int, ports: list[int]) -> list[str]:
    """TF_CONFIG for each of `count` workers; worker 0 is the chief."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports[:count]]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(count)]


def _pump(process: subprocess.Popen, prefix: str, digests: dict[str, str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        sys.stderr.write(f"[{prefix}] {line}")
        match = DIGEST.search(line)
        if match:
            digests[match.group(2)] = match.group(1)


def launch(params: Path, workers: int, distribution: str) -> dict[str, str]:
    """Run one multi-worker training job as `workers` local processes.

    Args:
        params: the params file (its folder is the project root).
        workers: number of worker processes (at least 2).
        distribution: `train.distribution` from params (must allow multi-worker).

    Returns:
        Each worker's final weights digest.

    Raises:
        ConfigError: fewer than two workers, or a distribution that is not auto or multi_worker.
        PipelineError: a worker failed, or the workers disagree on the final weights.
    """
    if workers < 2:
        raise ConfigError(f"--workers: a multi-worker job needs at least 2 workers, got {workers}")
    if distribution not in {"auto", "multi_worker"}:
        raise ConfigError(f"train.distribution is {distribution!r}; --workers needs 'auto' or 'multi_worker'")
    digests: dict[str, str] = {}
    processes, pumps = [], []
    for index, config in enumerate(worker_configs(workers, free_ports(workers))):
        env = {**os.environ, "TF_CONFIG": config}
        process = children.start(  # a killed launcher takes its workers with it
            [sys.executable, "-m", "pipeline", "train", "--params", str(params)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(process)
        pump = threading.Thread(target=_pump, args=(process, f"worker {index}", digests), daemon=True)
        pump.start()
        pumps.append(pump)
    failed = None
    while failed is None:
        codes = [process.poll() for process in processes]
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        if all(code == 0 for code in codes):
            break
        time.sleep(0.5)
    if failed is not None:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
        raise PipelineError(
            f"worker {failed} exited with {processes[failed].returncode}; all workers stopped. "
            "Rerun the same command: BackupAndRestore resumes from the last finished epoch"
        )
    for pump in pumps:
        pump.join()
    if len(digests) != workers or len(set(digests.values())) != 1:
        raise PipelineError(f"the workers disagree on the final weights: {digests}")
    return digests
