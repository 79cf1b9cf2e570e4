"""register: log the model to MLflow, register a version, and move aliases by the gate's verdict."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import mlflow

from pipeline import registry, tracking
from pipeline.artifacts import load_trained_model, read_class_names, read_report, write_report
from pipeline.config import PipelineConfig
from pipeline.errors import GateFailed, StaleGate
from pipeline.paths import StagePaths
from pipeline.registry import CHALLENGER, CHAMPION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The registered version and the alias it received."""

    model_name: str
    version: str
    alias: str
    previous_champion: str | None


def run(cfg: PipelineConfig, paths: StagePaths) -> RegisterResult:
    """Register this run's model; alias `champion` only when the gate passed, else `challenger`.

    Raises:
        GateFailed: after registering a challenger, listing the failed checks.
    """
    gate = read_report(paths.gate_report, "gate")
    name = cfg.mlflow.registered_model
    with tracking.resume_run(cfg.mlflow, paths) as active:
        version = registry.version_of_run(name, active.info.run_id)
        if version is None:
            version = registry.log_and_register(load_trained_model(paths)[0], name)
        registry.tag_version(name, version, gate, read_class_names(paths.classes))
        current = registry.champion(name)
        now = current.version if current is not None else None
        previous = now if now != version else None
        # The verdict holds for the champion the gate compared against; a rerun or a concurrent
        # run may have moved it since, and promoting on a stale verdict skips the comparison.
        compared = gate.get("champion_version")
        stale = gate["passed"] and now not in {compared, version}
        alias = CHAMPION if gate["passed"] and not stale else CHALLENGER
        registry.set_alias(name, alias, version, replaces=previous)
        mlflow.set_tag("registered_version", f"{name}/{version}@{alias}")
    result = RegisterResult(name, version, alias, previous)
    write_report(asdict(result), paths.register_report)
    log.info("registered %s version %s as %s", name, version, alias)
    if stale:
        raise StaleGate(
            f"the gate compared {name} version {version} against champion version {compared or 'none'}, "
            f"but the champion is version {now} now; the candidate stays '{CHALLENGER}'. Rerun the gate "
            "(`python -m pipeline gate`, or `dvc repro -s -f gate`) to compare it with the current champion"
        )
    if not gate["passed"]:
        failed = [
            f"{n}: value {c['value']}, threshold {c['threshold']} ({c['detail']})"
            for n, c in gate["checks"].items()
            if c["status"] == "failed"
        ]
        raise GateFailed(
            f"gate failed, so {name} version {version} is '{CHALLENGER}', not promoted; "
            f"'{CHAMPION}' stays at version {current.version if current else 'none'}. Failed checks: "
            + "; ".join(failed)
        )
    return result
