"""The distillation teacher named by `train.distill.teacher`: a registered version or a .keras file.

Train distils from it; evaluate scores it beside the student on the same test
split. Kept out of pipeline/train so evaluate does not load the training code.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import registry, tracking
from pipeline.config import DistillConfig, MlflowConfig, resolve_path
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Teacher:
    """The loaded teacher, where it came from, and its output classes when recorded."""

    model: Any
    uri: str  # as configured
    version: str | None  # the registry version it resolved to; None for a file
    source: str  # models:/<name>/<version>, or the file's path
    class_names: list[str] | None
    size_bytes: int | None  # the .keras file's size, when the teacher is a file

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version, "source": self.source}


def _from_registry(teacher: str, match: re.Match[str], mlflow_cfg: MlflowConfig, root: Path) -> Teacher:
    tracking.configure(mlflow_cfg, root)
    name = match["name"]
    if match["alias"]:
        found = registry.aliased(name, match["alias"])
        if found is None:
            raise ConfigError(
                f"train.distill.teacher: {teacher} does not exist (no alias '{match['alias']}' on {name}); "
                "register a teacher first or point at a .keras file"
            )
    else:
        try:
            found = registry.version(name, match["version"])
        except Exception as error:
            raise ConfigError(f"train.distill.teacher: {teacher} could not be read ({error})") from None
    log.info("distillation teacher: %s (%s)", teacher, found.uri)
    return Teacher(registry.load_model(found), teacher, found.version, found.uri, found.class_names, None)


def _from_file(teacher: str, root: Path) -> Teacher:
    import keras

    path = resolve_path(teacher, root)
    if path.suffix != ".keras" or not path.is_file():
        raise ConfigError(
            f"train.distill.teacher: {path} is not a .keras file; give models:/<name>@<alias>, "
            "models:/<name>/<version> or the path of a saved Keras model"
        )
    classes = path.parent / "classes.json"  # train writes the output order next to the model
    names = json.loads(classes.read_text(encoding="utf-8")) if classes.is_file() else None
    log.info("distillation teacher: %s", path)
    return Teacher(keras.models.load_model(path), teacher, None, str(path), names, path.stat().st_size)


def load_teacher(cfg: DistillConfig, mlflow_cfg: MlflowConfig, root: Path, class_names: list[str]) -> Teacher:
    """Load the configured teacher and check that it predicts the student's classes, in its order.

    Raises:
        ConfigError: the teacher does not exist, is not a Keras model, or has other classes.
    """
    match = MODELS_URI.match(cfg.teacher)
    if cfg.teacher.startswith("models:/") and match is None:
        raise ConfigError(
            f"train.distill.teacher: {cfg.teacher!r} is not models:/<name>@<alias> or "
            "models:/<name>/<version>"
        )
    try:
        teacher = (
            _from_registry(cfg.teacher, match, mlflow_cfg, root) if match else _from_file(cfg.teacher, root)
        )
    except PipelineError:
        raise
    except Exception as error:  # a file that is not a Keras model, an artifact that does not load
        raise ConfigError(
            f"train.distill.teacher: {cfg.teacher} could not be loaded ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from None
    outputs = int(teacher.model.output_shape[-1])
    if teacher.class_names is not None and teacher.class_names != class_names:
        raise ConfigError(
            f"train.distill.teacher: {cfg.teacher} predicts {teacher.class_names}, the student is trained on "
            f"{class_names}: a teacher must have the same classes in the same order"
        )
    if outputs != len(class_names):
        raise ConfigError(
            f"train.distill.teacher: {cfg.teacher} has {outputs} outputs, the training split has "
            f"{len(class_names)} classes"
        )
    return teacher
