"""validate: Great Expectations suites plus dataset checks over the manifest; quarantine, never delete."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import PipelineConfig
from pipeline.errors import DataValidationError
from pipeline.manifest import read_manifest
from pipeline.paths import StagePaths
from pipeline.validate.checks import Check, accepted_class_counts, dataset_checks
from pipeline.validate.expectations import run_suites
from pipeline.validate.quarantine import find_quarantine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationResult:
    """Every check, and how many files were accepted or quarantined."""

    checks: list[Check]
    accepted: int
    quarantined: int
    report: Path

    @property
    def blocking_failures(self) -> list[Check]:
        return [c for c in self.checks if c.blocking and not c.passed]

    @property
    def passed(self) -> bool:
        return not self.blocking_failures


def failure_message(check: Check) -> str:
    """One line naming a failed check and what it saw."""
    if check.message:
        return check.message
    return f"{check.name} failed: observed {check.observed}, expected {check.expected}"


def build_report(
    manifest: pd.DataFrame, quarantine: pd.DataFrame, accepted: pd.DataFrame, checks: list[Check]
) -> dict:
    """The JSON document written to reports/validation.json (its `summary` is the DVC metric)."""
    failures = [c for c in checks if not c.passed]
    return {
        "passed": not any(c.blocking for c in failures),
        "summary": {
            "files": len(manifest),
            "accepted": len(accepted),
            "quarantined": len(quarantine),
            "classes": int(manifest["label"].nunique()),
            "blocking_failures": sum(c.blocking for c in failures),
            "warnings": sum(not c.blocking for c in failures),
        },
        "quarantine_reasons": dict(sorted(Counter(quarantine["reason"]).items())),
        "accepted_per_class": accepted_class_counts(manifest, accepted),
        "checks": [asdict(c) for c in checks],
    }


def write_outputs(report: dict, quarantine: pd.DataFrame, paths: StagePaths) -> None:
    """Write the quarantine list and the validation report."""
    paths.quarantine.parent.mkdir(parents=True, exist_ok=True)
    quarantine.to_csv(paths.quarantine, index=False, lineterminator="\n", encoding="utf-8")
    paths.validation_report.parent.mkdir(parents=True, exist_ok=True)
    paths.validation_report.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


def run(config: PipelineConfig, paths: StagePaths) -> ValidationResult:
    """Validate the manifest, write the reports, and fail on blocking checks.

    The reports and quarantine list are written before failing, so a failed
    run can be inspected. Nothing under the raw folder is touched.

    Args:
        config: the configuration (its `validate` section).
        paths: resolved stage paths.

    Returns:
        The checks and counts.

    Raises:
        DataValidationError: listing each blocking check that failed.
    """
    cfg = config.validate_
    if not paths.manifest.is_file():
        raise DataValidationError(
            f"{paths.relative(paths.manifest)} not found; run `python -m pipeline ingest` first"
        )
    manifest = read_manifest(paths.manifest)
    quarantine = find_quarantine(manifest, cfg)
    accepted = manifest[~manifest["path"].isin(quarantine["file"])]
    checks = run_suites(manifest, cfg, paths.data_docs) + dataset_checks(manifest, accepted, cfg)
    report = build_report(manifest, quarantine, accepted, checks)
    write_outputs(report, quarantine, paths)
    result = ValidationResult(checks, len(accepted), len(quarantine), paths.validation_report)
    for row in quarantine.itertuples():
        log.warning("quarantined %s: %s (%s)", row.file, row.reason, row.detail)
    for check in checks:
        if not check.passed and not check.blocking:
            log.warning("warning: %s", failure_message(check))
    if result.blocking_failures:
        lines = "\n".join(f"  - {failure_message(c)}" for c in result.blocking_failures)
        raise DataValidationError(
            f"data validation failed ({len(result.blocking_failures)} blocking check(s); "
            f"see {paths.relative(paths.validation_report)}):\n{lines}"
        )
    log.info(
        "validation passed: %d accepted, %d quarantined -> %s",
        len(accepted),
        len(quarantine),
        paths.relative(paths.validation_report),
    )
    return result
