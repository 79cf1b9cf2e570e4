"""MLflow tracking: where runs go, the one run per pipeline execution, and what every run carries."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from sqlalchemy.engine import make_url

from pipeline.config import MlflowConfig, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or a SQLite file in the project (git-ignored)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


# Bounded HTTP retries for a tracking server (MLflow's own default backs off for minutes);
# set these variables yourself to change them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def check_server(uri: str, wait_seconds: float) -> None:
    """For an http(s) tracking URI, wait up to `wait_seconds` for its /health to answer.

    Raises:
        PipelineError: naming the URI, when the server does not answer in time.
    """
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            with urllib.request.urlopen(health, timeout=min(10.0, max(wait_seconds, 1.0))) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}"
        except (OSError, ValueError) as error:
            problem = f"{error.__class__.__name__}: {getattr(error, 'reason', error)}"
        if time.monotonic() >= deadline:
            raise PipelineError(
                f"MLflow tracking server {uri} is not reachable ({problem} from {health}, waited "
                f"{wait_seconds:.0f} s); start it (mlflow/start-server.sh) or fix MLFLOW_TRACKING_URI"
            )
        time.sleep(1.0)


def configure(cfg: MlflowConfig, root: Path) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists.

    With the local default, artifacts go to `<root>/mlartifacts`; with a
    server, the server decides (for example its proxied S3 store).

    Returns:
        The experiment id.
    """
    uri = tracking_uri(root)
    local = "MLFLOW_TRACKING_URI" not in os.environ
    if not local:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_seconds))
        check_server(uri, cfg.connect_timeout_seconds)
    mlflow.set_tracking_uri(uri)
    if local:  # set_tracking_uri exports the variable; keep "unset" meaning "this project's store"
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = (root / "mlartifacts").as_uri() if local else None
        return str(mlflow.create_experiment(cfg.experiment, artifact_location=location))
    except Exception as error:  # MLflow raises many types for an unreachable store
        raise PipelineError(
            f"MLflow tracking store {uri} is not usable: {error.__class__.__name__}: {error}. "
            "Check MLFLOW_TRACKING_URI or start the tracking server"
        ) from None


# Params that may hold a database URL with a password (from the environment); runs record them masked.
DATABASE_URL_PARAMS = {"tune.storage"}


def flat_params(cfg: PipelineConfig) -> dict[str, str]:
    """Every param as a dotted key, the way params.yaml spells it (passwords in database URLs masked)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = str(value)

    walk("", cfg.model_dump(mode="json", by_alias=True))
    for key in DATABASE_URL_PARAMS & flat.keys():
        if flat[key] != "None":
            flat[key] = make_url(flat[key]).render_as_string(hide_password=True)
    return flat


def git_commit(root: Path) -> str:
    """The checked-out commit, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dvc_data_hashes(root: Path, paths: StagePaths) -> dict[str, str]:
    """The DVC hashes of the raw data and splits, as recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    wanted = {paths.relative(paths.raw): "dvc.raw_md5", paths.relative(paths.splits): "dvc.splits_md5"}
    hashes = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") in wanted:
                hashes[wanted[out["path"]]] = out.get("md5", "")
    return hashes


def write_run_file(paths: StagePaths, run: Any) -> None:
    """Record the run for the stages after train."""
    paths.run_file.parent.mkdir(parents=True, exist_ok=True)
    paths.run_file.write_text(
        json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}, indent=2) + "\n"
    )


def read_run_id(paths: StagePaths) -> str:
    """The run id train wrote.

    Raises:
        PipelineError: when train has not run.
    """
    if not paths.run_file.is_file():
        raise PipelineError(
            f"{paths.relative(paths.run_file)} not found; run `python -m pipeline train` first"
        )
    return str(json.loads(paths.run_file.read_text())["run_id"])


@contextmanager
def resume_run(cfg: MlflowConfig, paths: StagePaths) -> Iterator[Any]:
    """Continue the run that train started, so one pipeline execution is one MLflow run."""
    configure(cfg, paths.root)
    with mlflow.start_run(run_id=read_run_id(paths)) as run:
        yield run
