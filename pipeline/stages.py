"""The stage registry: the ordered stage list and each stage's entry function, in one place.

`python -m pipeline <stage>` (pipeline/cli.py), the Prefect training flow
(flows/stages.py) and the test that holds `dvc.yaml` to this list all read
`STAGES`. Every entry is `run(cfg: PipelineConfig, paths: StagePaths)` in
the stage's own module; modules are imported only when their stage runs, so
`ingest` never loads TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.paths import StagePaths

StageFunction = Callable[[PipelineConfig, StagePaths], Any]


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml: its name, the module holding its `run`, and what it does."""

    name: str
    module: str
    summary: str

    def entry(self) -> StageFunction:
        """The stage's `run(cfg, paths)` (imports its module)."""
        function: StageFunction = importlib.import_module(self.module).run
        return function


# In an order that runs every stage after the stages whose outputs it reads (dvc.yaml's graph).
STAGES: tuple[Stage, ...] = (
    Stage("ingest", "pipeline.ingest", "Bring images from the configured source into the raw folder."),
    Stage(
        "validate", "pipeline.validate", "Run the data checks; quarantine bad files; fail on blocking ones."
    ),
    Stage("split", "pipeline.split", "Write the stratified train/val/test splits."),
    Stage("baseline", "pipeline.baseline", "Fit and score the HOG + PCA + SVM baseline."),
    Stage("train", "pipeline.train", "Train the configured model; starts the pipeline's MLflow run."),
    Stage("evaluate", "pipeline.evaluate", "Score the trained model on the test split."),
    Stage("reference", "pipeline.reference", "Profile the validation split: the drift reference."),
    Stage("robustness", "pipeline.robustness", "Accuracy under FGSM and common corruptions (test split)."),
    Stage("explain", "pipeline.explain", "Integrated Gradients, Grad-CAM and LIME on test images."),
    Stage("export", "pipeline.export", "Export SavedModel and TFLite variants, measured on the test split."),
    Stage("gate", "pipeline.gate", "Check the model against thresholds, the baseline and the champion."),
    Stage("register", "pipeline.register", "Register the model; alias champion only if the gate passed."),
)

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def stage(name: str) -> Stage:
    """The registered stage called `name`.

    Raises:
        KeyError: naming the known stages.
    """
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown stage '{name}'; the stages are {', '.join(STAGE_NAMES)}")
