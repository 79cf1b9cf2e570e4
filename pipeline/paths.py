"""StagePaths: every file and folder a stage reads or writes, resolved once against the project root.

No module builds an artifact path from a string literal: the names below are
the ones `dvc.yaml` declares (under the `paths:` of params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PathsConfig, resolve_path


@dataclass(frozen=True)
class StagePaths:
    """Absolute locations of every stage input and output under one root."""

    root: Path
    raw: Path
    manifest: Path
    quarantine: Path
    splits: Path
    reports: Path
    models: Path
    train_backup: Path
    batches: Path
    reference: Path

    @classmethod
    def from_config(cls, paths: PathsConfig, root: Path) -> StagePaths:
        """Resolve the configured paths against the project root."""
        root = root.resolve()
        return cls(
            root=root,
            **{name: resolve_path(getattr(paths, name), root) for name in PathsConfig.model_fields},
        )

    def resolve(self, path: Path | str) -> Path:
        """Another configured path (a landing area, a cache), resolved against the same root."""
        return resolve_path(path, self.root)

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    @property
    def split_report(self) -> Path:
        return self.reports / "split.json"

    @property
    def train_report(self) -> Path:
        """What the recipe decided for the data, and whether the model learned."""
        return self.reports / "train.json"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.csv"

    @property
    def tensorboard(self) -> Path:
        return self.reports / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def confusion_matrix(self) -> Path:
        return self.reports / "confusion_matrix.png"

    @property
    def classification_report(self) -> Path:
        return self.reports / "classification_report.txt"

    @property
    def predictions(self) -> Path:
        return self.reports / "predictions.csv"

    @property
    def baseline_report(self) -> Path:
        return self.reports / "baseline.json"

    @property
    def export_report(self) -> Path:
        return self.reports / "export.json"

    @property
    def robustness_report(self) -> Path:
        """Accuracy under FGSM per epsilon and under each corruption per severity."""
        return self.reports / "robustness.json"

    @property
    def robustness_plot(self) -> Path:
        return self.reports / "robustness.png"

    @property
    def explain(self) -> Path:
        """Saliency overlays (PNG) and index.html of the explain stage."""
        return self.reports / "explain"

    @property
    def gate_report(self) -> Path:
        return self.reports / "gate.json"

    @property
    def register_report(self) -> Path:
        return self.reports / "register.json"

    @property
    def drift_reports(self) -> Path:
        """`<batch>.json` and `<batch>.html` of each drift check."""
        return self.reports / "drift"

    @property
    def tune_report(self) -> Path:
        """The study's outcome: trial counts, best trial, its params, the MLflow parent run."""
        return self.reports / "tune.json"

    @property
    def tune_patch(self) -> Path:
        """The best params as a unified diff of params.yaml (`git apply`), never applied by the tool."""
        return self.reports / "tune.patch"

    def tune_plot(self, name: str) -> Path:
        """An Optuna plot of the study as HTML: optimization_history or param_importances."""
        return self.reports / f"tune_{name}.html"

    @property
    def keras_model(self) -> Path:
        return self.models / "keras" / "model.keras"

    @property
    def classes(self) -> Path:
        """The model's output order, written by train next to the model."""
        return self.models / "keras" / "classes.json"

    @property
    def checkpoint(self) -> Path:
        return self.models / "keras" / "checkpoint.keras"

    @property
    def run_file(self) -> Path:
        """Where train records the MLflow run that later stages resume."""
        return self.models / "mlflow_run.json"

    @property
    def savedmodel(self) -> Path:
        return self.models / "savedmodel"

    @property
    def tf_serving(self) -> Path:
        """The SavedModel in TF Serving's layout: <model name>/<version>/ and models.config."""
        return self.models / "serving"

    @property
    def tflite(self) -> Path:
        return self.models / "tflite"

    @property
    def onnx(self) -> Path:
        """The ONNX export: models/onnx/model.onnx."""
        return self.models / "onnx" / "model.onnx"

    @property
    def labels(self) -> Path:
        return self.models / "labels.txt"

    def split_file(self, name: str) -> Path:
        """The CSV of one split: train, val or test."""
        return self.splits / f"{name}.csv"

    def relative(self, path: Path) -> str:
        """A path as written in manifests: relative to the root, POSIX separators."""
        return path.relative_to(self.root).as_posix()
