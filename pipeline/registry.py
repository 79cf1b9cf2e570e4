"""The MLflow model registry: aliases, the champion, registering, tagging, promotion and rollback.

The only module that knows the alias names or loads a registered model: the
gate, the register stage, monitoring and serving all come here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow

from pipeline import tracking
from pipeline.config import MlflowConfig
from pipeline.errors import PipelineError, RegistryError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
REFERENCE_ARTIFACT = "drift_reference"  # where the drift reference profile lives in a model's run
SAVEDMODEL_ARTIFACT = "savedmodel"  # the exported bytes-in SavedModel in a model's run: what serving loads
CLASS_NAMES_TAG = "class_names"
PREVIOUS_CHAMPION_TAG = "previous_champion"


@dataclass(frozen=True)
class RegisteredModel:
    """One registered version: where it came from and what it predicts."""

    name: str
    version: str
    run_id: str
    created: datetime
    class_names: list[str] | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


def _describe(version: Any) -> RegisteredModel:
    tags = dict(version.tags or {})
    return RegisteredModel(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        created=datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC),
        class_names=json.loads(tags.get(CLASS_NAMES_TAG, "null") or "null"),
        tags=tags,
    )


def _absent(error: Exception) -> bool:
    """Whether an MLflow error says the registered model or the alias does not exist (and nothing else).

    The stores answer a missing model with RESOURCE_DOES_NOT_EXIST and a
    missing alias with INVALID_PARAMETER_VALUE "... alias <a> not found".
    """
    code = getattr(error, "error_code", "")
    message = str(getattr(error, "message", error))
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message


def aliased(model_name: str, alias: str) -> RegisteredModel | None:
    """The version that carries `alias`, or None when the model or the alias does not exist.

    Raises:
        RegistryError: for every other failure (a server answering 5xx, a timeout, a refused
            connection), naming the error and the tracking URI: "could not look" is never
            "there is none", or a gate would promote a candidate it never compared.
    """
    try:
        return _describe(mlflow.MlflowClient().get_model_version_by_alias(model_name, alias))
    except Exception as error:  # MlflowException, and requests' errors that MLflow lets through
        if _absent(error):
            return None
        detail = str(getattr(error, "message", error)).splitlines()[0][:300]
        raise RegistryError(
            f"the model registry at {mlflow.get_tracking_uri()} could not be read for "
            f"{model_name}@{alias} ({error.__class__.__name__}: {detail}); fix the tracking server or "
            "MLFLOW_TRACKING_URI and rerun"
        ) from None


def version(model_name: str, number: str) -> RegisteredModel:
    """One registered version by its number."""
    return _describe(mlflow.MlflowClient().get_model_version(model_name, number))


def newest_other_version(model_name: str, than: str) -> str | None:
    """The newest registered version other than `than`, or None when there is no other."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}'")
    others = sorted((int(v.version) for v in versions if str(v.version) != than), reverse=True)
    return str(others[0]) if others else None


def champion(model_name: str) -> RegisteredModel | None:
    """The registry's current champion, or None when there is none."""
    return aliased(model_name, CHAMPION)


def load_model(model: RegisteredModel) -> Any:
    """The Keras model of a registered version."""
    return mlflow.tensorflow.load_model(model.uri)


@contextmanager
def drift_reference(model: RegisteredModel) -> Iterator[Path]:
    """Download the version's drift reference profile into a temporary folder, for the block's duration.

    Raises:
        PipelineError: when the version's run carries no drift reference.
    """
    with tempfile.TemporaryDirectory(prefix="drift-reference-") as scratch:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=model.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=scratch
            )
        except (OSError, mlflow.exceptions.MlflowException) as error:
            raise PipelineError(
                f"{model} (run {model.run_id}) has no '{REFERENCE_ARTIFACT}' artifact "
                f"({error.__class__.__name__}); retrain it with this version of the pipeline so the "
                "reference stage records one"
            ) from None
        yield Path(folder)


def download_savedmodel(model_name: str, version: str, cache: Path) -> Path:
    """The version's exported SavedModel in `<cache>/<model>/<version>/`, downloaded once.

    The download goes to a temporary folder beside the target and is renamed into
    place, so a folder in the cache is always complete.

    Raises:
        RegistryError: when the registry cannot be read.
        PipelineError: when the version does not exist or its run has no SavedModel.
    """
    target = cache / model_name / version
    if target.is_dir():
        return target
    try:
        run_id = mlflow.MlflowClient().get_model_version(model_name, version).run_id
    except Exception as error:
        if _absent(error):
            raise PipelineError(f"{model_name} has no version {version}") from None
        raise RegistryError(
            f"the model registry at {mlflow.get_tracking_uri()} could not be read for {model_name} "
            f"version {version} ({error.__class__.__name__})"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=target.parent) as scratch:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=SAVEDMODEL_ARTIFACT, dst_path=scratch
            )
        except (OSError, mlflow.exceptions.MlflowException) as error:
            raise PipelineError(
                f"could not download '{SAVEDMODEL_ARTIFACT}' of {model_name} version {version} (run "
                f"{run_id}): {error.__class__.__name__}: {str(error)[:200]}. If the run has no such "
                "artifact, retrain it with this version of the pipeline, whose export stage logs one"
            ) from None
        try:
            Path(folder).rename(target)
        except OSError:  # another process (a second worker) put it there first
            if not target.is_dir():
                raise
    return target


def version_of_run(model_name: str, run_id: str) -> str | None:
    """The version already registered from this run (a rerun must not register it twice)."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def log_and_register(model: Any, model_name: str) -> str:
    """Log a Keras model (with signature and input example) to the active run, register it.

    The model's requirements are the versions running here, stated rather than inferred: MLflow's
    inference loads the model again in a child process (about 6 s a registration on 2 cores) and
    listed both tensorflow and tensorflow-cpu.

    Returns:
        The new version.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from mlflow.models import infer_signature

    example = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    keras.utils.disable_interactive_logging()  # MLflow's check of the logged model would draw a progress bar
    try:
        info = mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict_on_batch(example)),
            input_example=example,
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"numpy=={np.__version__}",
            ],
            registered_model_name=model_name,
        )
    finally:
        keras.utils.enable_interactive_logging()
    return str(info.registered_model_version)


def tag_version(model_name: str, version: str, gate: dict, class_names: list[str]) -> None:
    """Record the gate results, the output order and the drift reference on the version."""
    client = mlflow.MlflowClient()
    tags = {"gate.passed": str(gate["passed"]), CLASS_NAMES_TAG: json.dumps(class_names)}
    for name, check in gate["checks"].items():
        tags[f"gate.{name}"] = f"{check['status']} (value {check['value']}, threshold {check['threshold']})"
    run_id = client.get_model_version(model_name, version).run_id
    tags[REFERENCE_ARTIFACT] = f"runs:/{run_id}/{REFERENCE_ARTIFACT}"
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def set_alias(model_name: str, alias: str, version: str, replaces: str | None = None) -> None:
    """Move `alias` to `version`; a new champion remembers the version it replaced (for rollback)."""
    client = mlflow.MlflowClient()
    if alias == CHAMPION and replaces is not None:
        client.set_model_version_tag(model_name, version, PREVIOUS_CHAMPION_TAG, replaces)
    client.set_registered_model_alias(model_name, alias, version)


def rollback(cfg: MlflowConfig, root: Path, to_version: str | None = None) -> tuple[str, str]:
    """Move `champion` back: to `to_version`, or to the version the current champion replaced.

    Returns:
        (from_version, to_version).

    Raises:
        PipelineError: when there is no champion or nothing to roll back to.
    """
    tracking.configure(cfg, root)
    current = champion(cfg.registered_model)
    if current is None:
        raise PipelineError(f"{cfg.registered_model} has no '{CHAMPION}' alias; nothing to roll back")
    target = to_version or current.tags.get(PREVIOUS_CHAMPION_TAG)
    if not target:
        raise PipelineError(f"{current} has no previous champion; pass --to VERSION")
    client = mlflow.MlflowClient()
    client.get_model_version(cfg.registered_model, target)  # fails clearly if it does not exist
    client.set_registered_model_alias(cfg.registered_model, CHAMPION, target)
    log.info("champion of %s moved from version %s to %s", cfg.registered_model, current.version, target)
    return current.version, str(target)
