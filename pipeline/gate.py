"""gate: every check a model must pass to become champion, each with value, threshold and verdict."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

import mlflow
import numpy as np

from pipeline import registry, tracking
from pipeline.artifacts import (
    image_files,
    input_size,
    read_class_names,
    read_report,
    read_split,
    write_report,
)
from pipeline.config import GateConfig, PipelineConfig
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateCheck:
    """One check: `status` is passed, failed or skipped (skipped never counts as passed)."""

    name: str
    value: float | None
    threshold: float
    status: str
    detail: str = ""


@dataclass(frozen=True)
class GateResult:
    """All checks and the verdict."""

    checks: list[GateCheck]

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if c.status == "failed"]

    @property
    def passed(self) -> bool:
        return not self.failed


def at_least(name: str, value: float, threshold: float, detail: str = "") -> GateCheck:
    """A check that passes when value >= threshold."""
    return GateCheck(name, round(value, 6), threshold, "passed" if value >= threshold else "failed", detail)


def at_most(name: str, value: float, threshold: float, detail: str = "") -> GateCheck:
    """A check that passes when value <= threshold."""
    return GateCheck(name, round(value, 6), threshold, "passed" if value <= threshold else "failed", detail)


def threshold_checks(metrics: dict, baseline: dict, export: dict, cfg: GateConfig) -> list[GateCheck]:
    """The checks against fixed thresholds from params (pure)."""
    int8_drop = export["keras"]["accuracy"] - export["tflite"]["int8"]["accuracy"]
    checks = [
        at_least("min_accuracy", metrics["accuracy"], cfg.min_accuracy, "test accuracy"),
        at_least("min_macro_f1", metrics["macro_f1"], cfg.min_macro_f1, "test macro F1"),
        at_least(
            "margin_over_baseline",
            metrics["accuracy"] - baseline["accuracy"],
            cfg.min_margin_over_baseline,
            f"CNN accuracy {metrics['accuracy']:.4f} - HOG+SVM accuracy {baseline['accuracy']:.4f}",
        ),
        at_most(
            "int8_accuracy_drop",
            int8_drop,
            cfg.max_int8_accuracy_drop,
            "Keras accuracy - int8 TFLite accuracy on the test split",
        ),
    ]
    return [policy_note(check) if check.name in POLICY_THRESHOLDS else check for check in checks]


# Absolute floors that are product policy, not properties of the model: chosen for the digits, they
# decide whether anything trained on a harder folder is ever promoted. A failure says where to set them.
POLICY_THRESHOLDS = ("min_accuracy", "min_macro_f1")


def policy_note(check: GateCheck) -> GateCheck:
    """A failed policy threshold, with its detail saying it is a setting and where it lives."""
    if check.status != "failed":
        return check
    note = (
        f"; {check.threshold} is a policy value (gate.{check.name} in params.yaml), not a property of "
        "the data: set it to what your use needs (README: Using your own images)"
    )
    return dataclasses.replace(check, detail=check.detail + note)


def champion_accuracy(champion: registry.RegisteredModel, paths: StagePaths, class_names: list[str]) -> float:
    """Re-evaluate the champion on this test split (at its own input size)."""
    model = registry.load_model(champion)
    test = read_split(paths, "test")
    images = load_files(image_files(test, paths.root), input_size(model))
    labels = np.array([class_names.index(label) for label in test["label"]])
    return float((predict(model, images).argmax(axis=1) == labels).mean())


def champion_check(
    accuracy: float, class_names: list[str], cfg: PipelineConfig, paths: StagePaths
) -> GateCheck:
    """No regression beyond the tolerance against the current champion, on this test split."""
    tolerance = -cfg.gate.champion_tolerance
    champion = registry.champion(cfg.mlflow.registered_model)
    if champion is None:
        return GateCheck(
            "no_regression_vs_champion",
            None,
            tolerance,
            "skipped",
            f"no '{registry.CHAMPION}' alias on {cfg.mlflow.registered_model} yet (first model)",
        )
    if champion.class_names != class_names:
        return GateCheck(
            "no_regression_vs_champion",
            None,
            tolerance,
            "skipped",
            f"champion v{champion.version} predicts other classes {champion.class_names}",
        )
    theirs = champion_accuracy(champion, paths, class_names)
    return at_least(
        "no_regression_vs_champion",
        accuracy - theirs,
        tolerance,  # change vs champion
        f"accuracy {accuracy:.4f} vs champion v{champion.version} {theirs:.4f} on this test split",
    )


def run(cfg: PipelineConfig, paths: StagePaths) -> GateResult:
    """Run every check and write reports/gate.json; the register stage acts on the verdict."""
    metrics = read_report(paths.metrics, "evaluate")
    baseline = read_report(paths.baseline_report, "baseline")
    export = read_report(paths.export_report, "export")
    class_names = read_class_names(paths.classes)
    with tracking.resume_run(cfg.mlflow, paths):
        checks = threshold_checks(metrics, baseline, export, cfg.gate)
        checks.append(champion_check(metrics["accuracy"], class_names, cfg, paths))
        result = GateResult(checks)
        report = {"passed": result.passed, "checks": {c.name: asdict(c) for c in checks}}
        write_report(report, paths.gate_report)
        mlflow.log_metrics({f"gate_{c.name}": c.value for c in checks if c.value is not None})
        mlflow.set_tag("gate.passed", str(result.passed))
        mlflow.log_artifact(str(paths.gate_report), "reports")
    for check in checks:
        log.info(
            "gate %-26s %-7s value %s threshold %s %s",
            check.name,
            check.status,
            check.value,
            check.threshold,
            check.detail,
        )
    if not result.passed:
        log.warning(
            "gate failed: %s; register will not promote this model", ", ".join(c.name for c in result.failed)
        )
    return result
