"""Run one pipeline stage the way DVC would, so a flow run and `dvc repro` always agree.

A stage whose DVC status is clean is skipped (DVC's own up-to-date check,
not a second cache); a stage that ran is recorded with `dvc commit`, so the
lock file and cache are exactly what `dvc repro` would have left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import chdir
from pathlib import Path
from typing import Any

from dvc.repo import Repo

from pipeline import baseline, evaluate, export, gate, ingest, profile, register, split, train, validate
from pipeline.config import PipelineConfig, StagePaths, load_config

log = logging.getLogger(__name__)

STAGE_ORDER = (
    "ingest",
    "validate",
    "split",
    "baseline",
    "train",
    "evaluate",
    "reference",
    "export",
    "gate",
    "register",
)

STAGES: dict[str, Callable[[PipelineConfig, StagePaths], Any]] = {
    "ingest": lambda cfg, paths: ingest.run(cfg.ingest, paths, cfg.storage),
    "validate": lambda cfg, paths: validate.run(cfg.validate_, paths),
    "split": lambda cfg, paths: split.run(cfg.split, paths),
    "baseline": lambda cfg, paths: baseline.run(cfg.baseline, paths),
    "train": train.run,
    "evaluate": evaluate.run,
    "reference": profile.run,
    "export": export.run,
    "gate": gate.run,
    "register": register.run,
}


def is_up_to_date(root: Path, stage: str) -> bool:
    """True when `dvc status <stage>` reports nothing changed (deps, params, outs all match dvc.lock)."""
    with chdir(root), Repo(str(root)) as repo:  # DVC resolves some output paths against the cwd
        return not repo.status(targets=[stage])


def record(root: Path, stage: str) -> None:
    """`dvc commit <stage>`: hash the stage's outputs into the cache and dvc.lock."""
    with chdir(root), Repo(str(root)) as repo:
        repo.commit(stage, force=True)


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
        log.info("%s: up to date (dvc status), skipped", stage)
        return "skipped"
    params = root / "params.yaml"
    cfg = load_config(params, root)
    STAGES[stage](cfg, StagePaths.from_config(cfg.paths, root))
    record(root, stage)
    return "ran"
