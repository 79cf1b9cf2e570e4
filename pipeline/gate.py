"""gate: every check a model must pass to become champion, each with value, threshold and verdict."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd

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
from pipeline.errors import PipelineError, RegistryError
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths
from pipeline.serving import smoke

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
    int8_path = export.get("int8", {}).get("used", "ptq")  # older reports: post-training int8 only
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
            f"Keras accuracy - int8 TFLite accuracy on the test split (int8 by {int8_path})",
        ),
        pruned_check(export, cfg),
    ]
    return [policy_note(check) if check.name in POLICY_THRESHOLDS else check for check in checks]


def pruned_check(export: dict, cfg: GateConfig) -> GateCheck:
    """The pruned int8 model loses no more than int8 may (export.prune); skipped without one."""
    name = "pruned_accuracy_drop"
    row = export.get("tflite", {}).get("pruned_int8")
    if row is None:
        detail = export.get("pruning", {}).get("error") or "export.prune is null: no pruned variant"
        status = "failed" if "pruning" in export else "skipped"
        return GateCheck(name, None, cfg.max_int8_accuracy_drop, status, detail)
    return at_most(
        name,
        export["keras"]["accuracy"] - row["accuracy"],
        cfg.max_int8_accuracy_drop,
        f"Keras accuracy - pruned int8 accuracy (sparsity {row['sparsity']:.3f}, "
        f"gzip {row['gzip_size_bytes']} bytes vs {export['tflite']['int8']['gzip_size_bytes']} dense)",
    )


def robustness_checks(robustness: dict | None, cfg: GateConfig) -> list[GateCheck]:
    """Accuracy under FGSM and the worst corruption's drop (reports/robustness.json); skipped when unset."""
    from pipeline.robustness import fgsm_accuracy

    fgsm_name, corruption_name = "min_fgsm_accuracy", "max_corruption_drop"
    checks = []
    if cfg.min_fgsm_accuracy is None:
        checks.append(GateCheck(fgsm_name, None, 0.0, "skipped", "gate.min_fgsm_accuracy is null"))
    else:
        value = fgsm_accuracy(robustness or {}, cfg.fgsm_epsilon)
        if value is None:
            detail = f"reports/robustness.json has no FGSM accuracy at epsilon {cfg.fgsm_epsilon}"
            checks.append(GateCheck(fgsm_name, None, cfg.min_fgsm_accuracy, "failed", detail))
        else:
            detail = f"test accuracy under FGSM at epsilon {cfg.fgsm_epsilon} (0-1 pixel scale)"
            checks.append(at_least(fgsm_name, value, cfg.min_fgsm_accuracy, detail))
    if cfg.max_corruption_drop is None:
        checks.append(GateCheck(corruption_name, None, 0.0, "skipped", "gate.max_corruption_drop is null"))
    else:
        worst = (robustness or {}).get("worst_corruption")
        if worst is None:
            detail = "reports/robustness.json has no corruption results (robustness.corruptions)"
            checks.append(GateCheck(corruption_name, None, cfg.max_corruption_drop, "failed", detail))
        else:
            detail = (
                f"clean accuracy - accuracy under {worst['name']} at severity {worst['severity']} (the worst)"
            )
            checks.append(at_most(corruption_name, worst["drop"], cfg.max_corruption_drop, detail))
    return checks


# Absolute floors that are product policy, not properties of the model: chosen for the digits, they
# decide whether anything trained on a harder folder is ever promoted. A failure says where to set them.
POLICY_THRESHOLDS = ("min_accuracy", "min_macro_f1")


def policy_note(check: GateCheck) -> GateCheck:
    """A failed policy threshold, with its detail saying it is a setting and where it lives."""
    if check.status != "failed":
        return check
    note = (
        f"; {check.threshold} is a policy value (gate.{check.name} in params.yaml), not a property of "
        "the data: set it to what your use needs (README: Point it at your own images)"
    )
    return dataclasses.replace(check, detail=check.detail + note)


CHAMPION_CHECK = "no_regression_vs_champion"
SMOKE_CHECK = "serving_smoke_test"


def smoke_check(cfg: PipelineConfig, paths: StagePaths) -> GateCheck:
    """The exported SavedModel, served by the service's code in a child process, answers as evaluate did."""
    if not cfg.gate.serving_smoke_test:
        return GateCheck(SMOKE_CHECK, None, 1.0, "skipped", "gate.serving_smoke_test is false in params.yaml")
    result = smoke.run(cfg, paths)
    if result.agreement is None:
        return GateCheck(
            SMOKE_CHECK, None, 1.0, "failed", f"the candidate could not be served: {result.detail}"
        )
    return at_least(SMOKE_CHECK, result.agreement, 1.0, result.detail)


@dataclass(frozen=True)
class ChampionComparison:
    """The champion check, the champion version it compared against, and a registry failure if any."""

    check: GateCheck
    champion_version: str | None
    registry_error: str | None = None


def champion_hits(
    champion: registry.RegisteredModel, names: list[str], paths: StagePaths, test
) -> np.ndarray:
    """Whether the champion (at its own input size, in its own class order) is right on each test row."""
    model = registry.load_model(champion)
    images = load_files(image_files(test, paths.root), input_size(model))
    predicted = np.array(names)[predict(model, images).argmax(axis=1)]
    return np.asarray(predicted == test["label"].to_numpy())


def candidate_hits(paths: StagePaths) -> np.ndarray:
    """Whether the candidate is right on each test row, from evaluate's predictions (test split order)."""
    if not paths.predictions.is_file():
        raise PipelineError(
            f"{paths.relative(paths.predictions)} not found; run `python -m pipeline evaluate`"
        )
    predictions = pd.read_csv(paths.predictions, dtype=str, keep_default_na=False)
    return np.asarray(predictions["actual"].to_numpy() == predictions["predicted"].to_numpy())


def class_change(
    ours: list[str], champion: registry.RegisteredModel, policy: str, tolerance: float
) -> GateCheck | None:
    """The check when the classes differ and the policy decides without comparing (block, allow)."""
    theirs = champion.class_names or []
    added, removed = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    change = (
        f"the candidate's classes differ from champion v{champion.version}'s: "
        f"added {added or 'none'}, removed {removed or 'none'}"
    )
    if champion.class_names is None:
        change = f"champion v{champion.version} records no class names (tag '{registry.CLASS_NAMES_TAG}')"
    if policy == "allow":
        return GateCheck(CHAMPION_CHECK, None, tolerance, "skipped", f"{change}; gate.on_class_change: allow")
    if policy == "block" or not set(ours) & set(theirs):
        return GateCheck(
            CHAMPION_CHECK,
            None,
            tolerance,
            "failed",
            f"{change}; gate.on_class_change is '{policy}'"
            + (" and no class is shared" if policy != "block" else "")
            + ": set it to 'compare_common' (compare on the test images of the shared classes) or "
            "'allow' (promote without comparing) in params.yaml if the change is intended",
        )
    return None


def champion_check(accuracy: float, class_names: list[str], cfg: PipelineConfig, paths: StagePaths):
    """No regression beyond the tolerance against the current champion, on this test split.

    Fails closed: a registry that cannot be read fails the check (it never
    reads as "no champion"), and a class change blocks unless
    `gate.on_class_change` says to compare on the shared classes or allow it.
    """
    tolerance = -cfg.gate.champion_tolerance
    name = cfg.mlflow.registered_model
    try:
        tracking.configure(cfg.mlflow, paths.root)
        champion = registry.champion(name)
    except PipelineError as error:
        detail = f"the champion could not be looked up, so the candidate was not compared: {error}"
        return ChampionComparison(
            GateCheck(CHAMPION_CHECK, None, tolerance, "failed", detail), None, str(error)
        )
    if champion is None:
        detail = f"no '{registry.CHAMPION}' alias on {name} yet (first model)"
        return ChampionComparison(GateCheck(CHAMPION_CHECK, None, tolerance, "skipped", detail), None)
    test = read_split(paths, "test")
    if champion.class_names == class_names:
        ours, rows, names = accuracy, test, class_names
        scope = "this test split"
    else:
        decided = class_change(class_names, champion, cfg.gate.on_class_change, tolerance)
        if decided is not None:
            return ChampionComparison(decided, champion.version)
        shared = test["label"].isin(champion.class_names or []).to_numpy()
        ours, rows, names = (
            float(candidate_hits(paths)[shared].mean()),
            test[shared],
            champion.class_names or [],
        )
        scope = f"the {int(shared.sum())} test images of the shared classes (gate.on_class_change)"
    try:
        theirs = float(champion_hits(champion, names, paths, rows).mean())
    except Exception as error:  # the champion's model could not be downloaded or loaded
        detail = (
            f"champion v{champion.version} could not be loaded from {champion.uri} "
            f"({error.__class__.__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}), "
            "so the candidate was not compared"
        )
        failed = GateCheck(CHAMPION_CHECK, None, tolerance, "failed", detail)
        return ChampionComparison(failed, champion.version, detail)
    check = at_least(
        CHAMPION_CHECK,
        ours - theirs,
        tolerance,  # change vs champion
        f"accuracy {ours:.4f} vs champion v{champion.version} {theirs:.4f} on {scope}",
    )
    return ChampionComparison(check, champion.version)


def run(cfg: PipelineConfig, paths: StagePaths) -> GateResult:
    """Run every check and write reports/gate.json; the register stage acts on the verdict."""
    metrics = read_report(paths.metrics, "evaluate")
    baseline = read_report(paths.baseline_report, "baseline")
    export = read_report(paths.export_report, "export")
    class_names = read_class_names(paths.classes)
    checks = threshold_checks(metrics, baseline, export, cfg.gate)
    robustness = None
    if cfg.gate.min_fgsm_accuracy is not None or cfg.gate.max_corruption_drop is not None:
        robustness = read_report(paths.robustness_report, "robustness")
    checks.extend(robustness_checks(robustness, cfg.gate))
    checks.append(smoke_check(cfg, paths))
    comparison = champion_check(metrics["accuracy"], class_names, cfg, paths)
    checks.append(comparison.check)
    result = GateResult(checks)
    report = {
        "passed": result.passed,
        "champion_version": comparison.champion_version,  # register refuses when the champion moved since
        "checks": {c.name: asdict(c) for c in checks},
    }
    write_report(report, paths.gate_report)  # first: also when the registry is down, gate.json says why
    if comparison.registry_error is not None:
        raise RegistryError(
            f"gate failed closed ({paths.relative(paths.gate_report)}): {comparison.registry_error}"
        )
    with tracking.resume_run(cfg.mlflow, paths):
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
