"""No orphans: every process the pipeline starts ends when the process that started it is killed.

A SIGKILL (the OOM killer, a node drain) gives a process no chance to stop its
children; they must notice on their own (pipeline/children.py). The slow test
kills `python -m flows.training` mid-train and checks that its temporary
Prefect server and any other descendant are gone, then that the rerun resumes
the training from its BackupAndRestore state and finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import pytest

from tests.conftest import REPO_ROOT
from tests.integration.test_flows import small_project

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the tie is Linux's prctl; the test reads /proc"
)

EPOCHS = 8  # long enough that the kill lands mid-train, short enough for a quick rerun
T = TypeVar("T")


def process_table() -> dict[int, tuple[int, int]]:
    """Every live process as {pid: (parent pid, start time)}, from /proc; zombies count as gone.

    A pid with its start time (clock ticks since boot) tells a survivor from a new process that
    reused its pid.
    """
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, parent, *fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):  # not a process, or it just ended
            continue
        if state not in {"Z", "X"}:
            table[int(entry.name)] = (int(parent), int(fields[17]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of `pid`, as {pid: start time}."""
    table = process_table()
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (its_parent, started) in table.items():
            if its_parent == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def survivors(processes: dict[int, int]) -> dict[int, str]:
    """Those of `processes` ({pid: start time}) still alive, with their command lines."""
    table = process_table()
    alive = {}
    for pid, started in processes.items():
        if pid in table and table[pid][1] == started:
            try:
                alive[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return alive


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_all(processes: dict[int, int]) -> None:
    """SIGKILL whatever of `processes` is still alive, so a failing test leaves nothing behind either."""
    for pid in survivors(processes):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_tied_child_ends_with_its_killed_parent(tied: bool) -> None:
    """A middle process starts a sleeping grandchild (tied to it or not), then is SIGKILLed."""
    middle = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from pipeline import children
        command = [sys.executable, "-c", "import time; time.sleep(120)"]
        child = children.start(command) if {tied} else subprocess.Popen(command)
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", middle], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    watched = {child: process_table()[child][1]}
    try:
        parent.kill()
        parent.wait()
        if tied:
            wait_for(lambda: True if not survivors(watched) else None, 5, "the tied child to end")
        else:  # the control: without the tie the child outlives its parent
            time.sleep(1)
            assert survivors(watched)
    finally:
        kill_all(watched)


def orphan_project(target: Path) -> Path:
    """A small project (test_flows.small_project) training for EPOCHS epochs.

    The gate's thresholds are off: the test is about processes, not about what the model learned.
    """

    def edit(params: dict) -> None:
        params["train"]["epochs"] = EPOCHS
        params["gate"].update({"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_int8_accuracy_drop": 1.0})
        params["mlflow"]["registered_model"] = "orphan-test"

    return small_project(target, per_class=20, extra=edit)


def flow_environment(prefect_home: Path) -> dict[str, str]:
    """As `make run` on a machine with no Prefect server configured, with its own Prefect home."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_API", "PREFECT_PROFILE"))
    }
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "GX_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1",
    }


def epochs_backed_up(root: Path) -> int | None:
    """Epochs BackupAndRestore has saved for the interrupted training, None before the first."""
    for metadata in (root / ".cache" / "train_backup").glob("*/train/training_metadata.json"):
        try:
            return int(json.loads(metadata.read_text())["epoch"]) or None
        except (OSError, ValueError, KeyError):
            return None  # being written
    return None


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_flow_leaves_no_process_and_its_rerun_resumes(tmp_path: Path) -> None:
    root = orphan_project(tmp_path / "project")
    env = flow_environment(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "flows.training"]
    with (tmp_path / "killed.log").open("w") as log:
        flow = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: dict[int, int] = {}
    try:
        wait_for(lambda: epochs_backed_up(root), 240, "the first epoch of training")
        started = descendants(flow.pid)
        assert any("uvicorn" in line for line in survivors(started).values()), "no temporary server seen"
        flow.kill()
        killed_at = time.time()
        flow.wait()
        try:
            wait_for(lambda: True if not survivors(started) else None, 5, "the flow's children to end")
        except AssertionError:
            pytest.fail(f"alive 5 s after the flow was killed: {survivors(started)}")
    finally:
        flow.kill()
        kill_all(started)

    done = epochs_backed_up(root)
    assert done is not None and done < EPOCHS, done
    backed_up_run = next((root / ".cache" / "train_backup").glob("*/mlflow_run_id")).read_text().strip()

    rerun = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "rerun.log").write_text(rerun.stdout + rerun.stderr)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    ran = next(line for line in rerun.stdout.splitlines() if line.startswith("stages run:"))
    assert {"train", "gate", "register"} <= set(ran.removeprefix("stages run:").replace(",", " ").split())

    run_id = json.loads((root / "models" / "mlflow_run.json").read_text())["run_id"]
    assert run_id == backed_up_run, "the rerun started a new MLflow run instead of resuming"
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "accuracy")
    rerun_epochs = sorted(metric.step for metric in history if metric.timestamp / 1000 > killed_at)
    assert rerun_epochs == list(range(done, EPOCHS)), "the rerun did not continue from the backed-up epoch"
