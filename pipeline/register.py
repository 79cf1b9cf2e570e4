"""register: log the model to MLflow, register a version, and move aliases by the gate's verdict."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.models import infer_signature

from pipeline import tracking
from pipeline.config import MlflowConfig, PipelineConfig, StagePaths
from pipeline.errors import GateFailed, PipelineError
from pipeline.gate import CHALLENGER, CHAMPION, champion_version
from pipeline.profile import REFERENCE_ARTIFACT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The registered version and the alias it received."""

    model_name: str
    version: str
    alias: str
    previous_champion: str | None


def registered_version(client: mlflow.MlflowClient, model_name: str, run_id: str) -> str | None:
    """The version already registered from this run (a rerun must not register it twice)."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def log_and_register(paths: StagePaths, model_name: str) -> str:
    """Log the Keras model with signature and input example, register it, return the version."""
    from pipeline.train.models import load_trained

    model, _ = load_trained(paths.keras_model)
    example = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    info = mlflow.tensorflow.log_model(
        model,
        name="model",
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        registered_model_name=model_name,
    )
    return str(info.registered_model_version)


def tag_version(
    client: mlflow.MlflowClient, model_name: str, version: str, gate: dict, class_names: list[str]
) -> None:
    """Record the gate results and the output order on the model version."""
    client.set_model_version_tag(model_name, version, "gate.passed", str(gate["passed"]))
    for name, check in gate["checks"].items():
        client.set_model_version_tag(
            model_name,
            version,
            f"gate.{name}",
            f"{check['status']} (value {check['value']}, threshold {check['threshold']})",
        )
    client.set_model_version_tag(model_name, version, "class_names", json.dumps(class_names))
    run_id = client.get_model_version(model_name, version).run_id
    client.set_model_version_tag(
        model_name, version, "drift_reference", f"runs:/{run_id}/{REFERENCE_ARTIFACT}"
    )


def run(cfg: PipelineConfig, paths: StagePaths) -> RegisterResult:
    """Register this run's model; alias `champion` only when the gate passed, else `challenger`.

    Raises:
        GateFailed: after registering a challenger, listing the failed checks.
    """
    from pipeline.train.data import read_class_names

    gate = json.loads(paths.report("gate.json").read_text())
    name = cfg.mlflow.registered_model
    with tracking.resume_run(cfg.mlflow, paths) as active:
        client = mlflow.MlflowClient()
        version = registered_version(client, name, active.info.run_id) or log_and_register(paths, name)
        tag_version(client, name, version, gate, read_class_names(paths.keras_model.parent / "classes.json"))
        current = champion_version(name)
        previous = str(current.version) if current is not None and str(current.version) != version else None
        alias = CHAMPION if gate["passed"] else CHALLENGER
        if alias == CHAMPION and previous is not None:
            client.set_model_version_tag(name, version, "previous_champion", previous)
        client.set_registered_model_alias(name, alias, version)
        mlflow.set_tag("registered_version", f"{name}/{version}@{alias}")
    result = RegisterResult(name, version, alias, previous)
    paths.report("register.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")
    log.info("registered %s version %s as %s", name, version, alias)
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


def rollback(cfg: MlflowConfig, root, to_version: str | None = None) -> tuple[str, str]:
    """Move `champion` back: to `to_version`, or to the version the current champion replaced.

    Returns:
        (from_version, to_version).

    Raises:
        PipelineError: when there is no champion or nothing to roll back to.
    """
    tracking.configure(cfg, root)
    current = champion_version(cfg.registered_model)
    if current is None:
        raise PipelineError(f"{cfg.registered_model} has no '{CHAMPION}' alias; nothing to roll back")
    target = to_version or current.tags.get("previous_champion")
    if not target:
        raise PipelineError(
            f"{cfg.registered_model} v{current.version} has no previous champion; pass --to VERSION"
        )
    client = mlflow.MlflowClient()
    client.get_model_version(cfg.registered_model, target)  # fails clearly if it does not exist
    client.set_registered_model_alias(cfg.registered_model, CHAMPION, target)
    log.info("champion of %s moved from version %s to %s", cfg.registered_model, current.version, target)
    return str(current.version), str(target)
