"""Orchestration overhead: one pipeline as plain stage functions, as `dvc repro`, and as the Prefect flow.

Each variant runs from scratch in its own fresh copy of the project (same
params, same embedded data, empty MLflow store), as a separate process, so
start-up costs count. Prints wall times and the ratios to the plain functions,
all measured in this one run. Not part of the test suite.

The code measured is commit `--ref` (default HEAD, taken with `git archive`),
so edits in the working tree, committed or not, neither leak into the figures
nor break the copies; `--ref worktree` takes the tracked and untracked
(not ignored) files as they are now instead. `--set train.max_steps=20`
(repeatable) overrides a params.yaml value in the copies, for a quick check
that the bench runs; the recorded figures use params.yaml as it is.

    .venv/bin/python bench/orchestration.py [--repeats 3] [--ref HEAD] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import header  # noqa: E402

PLAIN = """
from pathlib import Path
from pipeline.config import load_config
from pipeline.paths import StagePaths
from pipeline.stages import STAGES
root = Path.cwd()
cfg = load_config(root / "params.yaml", root)
paths = StagePaths.from_config(cfg.paths, root)
for stage in STAGES:
    stage.entry()(cfg, paths)
"""

BIN = Path(sys.executable).parent
FLOW = [sys.executable, "-m", "flows.training"]
# name: (command, uses the long-running Prefect server)
VARIANTS = {
    "plain functions": ([sys.executable, "-c", PLAIN], False),
    "dvc repro": ([str(BIN / "dvc"), "repro"], False),
    "flow, temp server": (FLOW, False),  # what `make run` does: Prefect starts a server for the run
    "flow, server up": (FLOW, True),  # a deployed setup: `prefect server start` already running
}
SERVER_PORT = 4263


def snapshot(target: Path, ref: str) -> str:
    """The project's files at commit `ref` (or the working tree's, for "worktree"); what was taken.

    Taken once, so edits during the run change nothing.
    """
    git = ["git", "-C", str(ROOT)]
    if ref == "worktree":
        listed = subprocess.run(
            [*git, "ls-files", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in listed.splitlines():
            if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
        return "the working tree (tracked and untracked files)"
    commit = subprocess.run([*git, "rev-parse", "--short", ref], capture_output=True, text=True, check=True)
    archive = subprocess.run([*git, "archive", ref], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="tar")
    return f"commit {commit.stdout.strip()} (git archive {ref})"


def override_params(project: Path, overrides: list[str]) -> None:
    """Set dotted params.yaml keys (`train.max_steps=20`) in a copy; values are read as YAML."""
    if not overrides:
        return
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            section = section[name]
        if leaf not in section:
            raise SystemExit(f"--set {override}: params.yaml has no key {key}")
        section[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def fresh_copy(source: Path, target: Path) -> Path:
    """A copy of the snapshot in a new git repository (DVC needs one)."""
    shutil.copytree(source, target)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "bench"],
    ):
        subprocess.run(command, cwd=target, check=True)
    return target


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of one command; fails loudly if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed in {cwd}:\n{done.stderr[-3000:]}")
    return elapsed


def start_server(env: dict[str, str]) -> subprocess.Popen:
    """A Prefect server on loopback, as `prefect server start` runs it for a team."""
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(SERVER_PORT)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{SERVER_PORT}/api/health", timeout=1):
                return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the Prefect server did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="full runs per variant (median is reported)")
    parser.add_argument("--ref", default="HEAD", help='commit to measure, or "worktree" (default: HEAD)')
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override in the copies"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(header(["prefect", "dvc", "mlflow", "tensorflow"]), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as scratch:
        env = {
            **os.environ,
            "PREFECT_HOME": str(Path(scratch) / "prefect-home"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "GX_ANALYTICS_ENABLED": "False",
            "DVC_NO_ANALYTICS": "1",
            # dvc repro runs `python -m pipeline ...`: the project's interpreter, as in an activated venv
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        # Prefect creates its database on first use; do that before timing, as a user's install has it.
        source = Path(scratch) / "snapshot"
        source.mkdir()
        measured = snapshot(source, args.ref)
        override_params(source, args.set)
        print(f"measured code: {measured}; params overrides: {args.set or 'none'}", flush=True)
        warm = fresh_copy(source, Path(scratch) / "warm-up")
        warm_up = "from flows.retraining import drift_check_flow; drift_check_flow()"
        timed([sys.executable, "-c", warm_up], warm, env)

        server = start_server(env)
        served = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{SERVER_PORT}/api"}
        results: dict[str, list[float]] = {name: [] for name in VARIANTS}
        noop: dict[str, float] = {}
        try:
            for repeat in range(args.repeats):
                for number, (name, (command, use_server)) in enumerate(VARIANTS.items()):
                    project = fresh_copy(source, Path(scratch) / f"variant{number}-{repeat}")
                    (project / "dvc.lock").unlink(missing_ok=True)  # from scratch: nothing up to date
                    results[name].append(timed(command, project, served if use_server else env))
                    print(f"{name:18s} run {repeat + 1}: {results[name][-1]:7.1f} s", flush=True)
                    if name != "plain functions" and repeat == 0:
                        noop[name] = timed(command, project, served if use_server else env)
        finally:
            server.terminate()
            server.wait(timeout=30)

    median = {name: statistics.median(times) for name, times in results.items()}
    base = median["plain functions"]
    params = f"params.yaml with {', '.join(args.set)}" if args.set else "params.yaml defaults"
    print(f"\nworkload: embedded digits, {params}, every stage from scratch")
    print(f"{'variant':18s} | {'wall s':>7s} | ratio to plain")
    print(f"{'-' * 18}-+-{'-' * 7}-+-{'-' * 14}")
    for name, seconds in median.items():
        print(f"{name:18s} | {seconds:7.1f} | {seconds / base:6.3f}")
    print("\nsecond run with nothing changed (all stages skipped):")
    for name, seconds in noop.items():
        print(f"{name:18s} | {seconds:7.1f} s")
    for name in ("flow, temp server", "flow, server up"):
        print(f"{name} overhead vs plain functions: {median[name] / base - 1:+.1%} (target: at most +10%)")


if __name__ == "__main__":
    main()
