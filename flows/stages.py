"""Run one pipeline stage the way DVC would, so a flow run and `dvc repro` always agree.

A stage whose DVC status is clean is skipped (DVC's own up-to-date check,
not a second cache); a stage that ran is recorded with `dvc commit`, so the
lock file and cache are exactly what `dvc repro` would have left.
"""

from __future__ import annotations

import logging
from contextlib import chdir
from pathlib import Path

from dvc.repo import Repo

from pipeline.config import load_config
from pipeline.paths import StagePaths
from pipeline.stages import stage as registered

log = logging.getLogger(__name__)


def is_up_to_date(root: Path, stage: str) -> bool:
    """True when `dvc status <stage>` reports nothing changed (deps, params, outs all match dvc.lock)."""
    with chdir(root), Repo(str(root)) as repo:  # DVC resolves some output paths against the cwd
        return not repo.status(targets=[stage])


def record(root: Path, stage: str) -> None:
    """`dvc commit <stage>`: hash the stage's outputs into the cache and dvc.lock."""
    with chdir(root), Repo(str(root)) as repo:
        repo.commit(stage, force=True)


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task (so the line shows in the UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def run_stage(stage: str, root: Path, force: bool = False) -> str:
    """Run `stage` unless DVC says it is up to date; record it in DVC when it ran.

    Args:
        stage: a stage name from dvc.yaml.
        root: the project root (a DVC repository).
        force: run even when up to date (as `dvc repro --force <stage>`).

    Returns:
        'skipped' or 'ran'.
    """
    if not force and is_up_to_date(root, stage):
        stage_logger().info("%s: up to date (dvc status), skipped", stage)
        return "skipped"
    stage_logger().info("%s: %s", stage, registered(stage).summary)
    cfg = load_config(root / "params.yaml", root)
    registered(stage).entry()(cfg, StagePaths.from_config(cfg.paths, root))
    record(root, stage)
    return "ran"


# Who `dvc exp save` commits as when git has no identity configured (a fresh CI machine, a container).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "image-pipeline",
    "GIT_AUTHOR_EMAIL": "image-pipeline@localhost",
    "GIT_COMMITTER_NAME": "image-pipeline",
    "GIT_COMMITTER_EMAIL": "image-pipeline@localhost",
}


def save_experiment(root: Path, name: str) -> str:
    """`dvc exp save -n <name>`: keep the workspace's params, dvc.lock and metrics as a DVC experiment.

    The workspace itself is left as it is; `dvc exp show` lists the experiment
    and `dvc exp apply <name>` brings it back.

    Returns:
        The experiment's name, or why it could not be saved (no git repository, say).
    """
    import os
    import subprocess

    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    configured = (
        subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode == 0
    )
    missing = {} if configured else {k: v for k, v in GIT_IDENTITY.items() if not os.environ.get(k)}
    os.environ.update(missing)  # only for the commit below, and only when git knows no user
    try:
        with chdir(root), Repo(str(root)) as repo:
            repo.experiments.save(name=name, force=True)
        return name
    except (DvcException, SCMError) as error:
        log.warning("could not save DVC experiment %s: %s", name, error)
        return f"not saved ({error.__class__.__name__}: {error})"
    finally:
        for key in missing:
            os.environ.pop(key, None)
