"""Where the service's versions come from: the MLflow registry's aliases, or one exported folder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from pipeline import registry, tracking
from pipeline.config import PipelineConfig
from pipeline.serving.service import CANARY, STABLE

LABELS = {STABLE: registry.CHAMPION, CANARY: registry.CHALLENGER}  # service label -> registry alias


@dataclass(frozen=True)
class FolderSource:
    """One SavedModel folder served as `stable` (the gate's smoke test, `python -m serving --model-dir`)."""

    model_name: str
    folder: Path
    version: str = "1"

    def wanted(self) -> dict[str, str]:
        return {STABLE: self.version}

    def fetch(self, version: str) -> Path:
        return self.folder

    def describe(self) -> str:
        return str(self.folder)

    def nothing_to_serve(self) -> str:
        return f"{self.folder} has not loaded"

    def reference(self, version: str) -> dict[str, Any] | None:
        return None  # a bare folder carries no test accuracy or training distribution


class RegistrySource:
    """`mlflow.registered_model`'s `champion` as `stable` and `challenger` as `canary`.

    SavedModels are downloaded from each version's run into `serve.cache`.
    """

    def __init__(self, cfg: PipelineConfig, root: Path, model_name: str | None = None) -> None:
        self.cfg, self.root = cfg, root
        self.model_name = model_name or cfg.mlflow.registered_model
        self.cache = cfg.serve.cache if cfg.serve.cache.is_absolute() else root / cfg.serve.cache
        self.uri = tracking.tracking_uri(root)
        self._configured = False

    def wanted(self) -> dict[str, str]:
        if not self._configured:  # at the first poll, not at start: an unreachable server means 503
            tracking.configure(self.cfg.mlflow, self.root)
            self.uri, self._configured = mlflow.get_tracking_uri(), True
        found = {label: registry.aliased(self.model_name, alias) for label, alias in LABELS.items()}
        return {label: model.version for label, model in found.items() if model is not None}

    def fetch(self, version: str) -> Path:
        return registry.download_savedmodel(self.model_name, version, self.cache)

    def describe(self) -> str:
        return f"the registry at {self.uri}"

    def reference(self, version: str) -> dict[str, Any] | None:
        """The version's test accuracy and class shares, from the drift reference its run recorded.

        The class shares are those of the reference's validation images: the split is stratified,
        so they are the training split's shares too.
        """
        entry = registry.version(self.model_name, version)
        with registry.drift_reference(entry) as folder:
            meta = json.loads((folder / "profile.json").read_text(encoding="utf-8"))
        labels = Counter(meta.get("labels") or [])
        total = sum(labels.values())
        return {
            "test_accuracy": float(meta["test_accuracy"]),
            "training_class_share": {c: round(n / total, 6) for c, n in sorted(labels.items())}
            if total
            else None,
        }

    def nothing_to_serve(self) -> str:
        return (
            f"no version of {self.model_name} has the '{registry.CHAMPION}' alias in {self.uri} yet; "
            "run the pipeline (`make run`) to train and register one, and this service loads it within "
            "serve.poll_seconds"
        )
