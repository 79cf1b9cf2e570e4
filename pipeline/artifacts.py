"""Reading and writing the small files stages hand to each other: splits, class names, JSON reports.

Kept apart from the stages so that reading a CSV does not import Keras,
MLflow or scikit-learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.paths import StagePaths


def read_split(paths: StagePaths, name: str) -> pd.DataFrame:
    """One split's rows (path, label, ...) as written by the split stage.

    Raises:
        PipelineError: when the split stage has not written it.
    """
    file = paths.split_file(name)
    if not file.is_file():
        raise PipelineError(f"{paths.relative(file)} not found; run `python -m pipeline split` first")
    return pd.read_csv(file, dtype=str, keep_default_na=False)


def class_names_of(train: pd.DataFrame) -> list[str]:
    """Output order of the model: the sorted labels of the training split."""
    return sorted(train["label"].unique())


def write_class_names(names: list[str], path: Path) -> None:
    """Store the model's output order next to the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(names) + "\n", encoding="utf-8")


def read_class_names(path: Path) -> list[str]:
    """The output order written by train."""
    return list(json.loads(path.read_text(encoding="utf-8")))


def write_report(report: dict[str, Any], path: Path) -> None:
    """A JSON report, indented, with a final newline (stable bytes for DVC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def read_report(path: Path, stage: str) -> dict[str, Any]:
    """A JSON report another stage wrote.

    Args:
        path: the report file.
        stage: the stage that writes it, named in the error.

    Raises:
        PipelineError: when the report is missing.
    """
    if not path.is_file():
        raise PipelineError(f"{path} not found; run `python -m pipeline {stage}` first")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def image_files(frame: pd.DataFrame, root: Path) -> list[Path]:
    """The image files of split or manifest rows (`path` is relative to the project root)."""
    return [root / path for path in frame["path"]]


def load_trained_model(paths: StagePaths) -> tuple[Any, list[str]]:
    """The trained Keras model and its class names (output order), as train saved them.

    Raises:
        PipelineError: when train has not run.
    """
    if not paths.keras_model.is_file():
        raise PipelineError(
            f"{paths.relative(paths.keras_model)} not found; run `python -m pipeline train` first"
        )
    import keras

    return keras.models.load_model(paths.keras_model), read_class_names(paths.classes)


def input_size(model: Any) -> int:
    """The side of a trained model's square input (what `train.image_size: auto` decided)."""
    return int(model.input_shape[1])
