"""The Great Expectations 1.x suites over the manifest, run through a checkpoint that builds Data Docs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from great_expectations.expectations.metadata_types import FailureSeverity

from pipeline.config import ValidateConfig
from pipeline.validate.checks import Check

CRITICAL, WARNING = FailureSeverity.CRITICAL, FailureSeverity.WARNING


def manifest_expectations(cfg: ValidateConfig) -> list[Any]:
    """Expectations over every ingested file, images or not."""
    import great_expectations as gx

    x = gx.expectations
    expectations = [
        x.ExpectTableRowCountToBeBetween(min_value=1, severity=CRITICAL),
        x.ExpectColumnValuesToNotBeNull(column="label", severity=CRITICAL),
        x.ExpectColumnValuesToBeUnique(column="path", severity=CRITICAL),
        x.ExpectColumnUniqueValueCountToBeBetween(
            column="label", min_value=cfg.min_classes, severity=CRITICAL
        ),
        # Single bad files are quarantined; a high share of them means the source is wrong.
        x.ExpectColumnValuesToBeInSet(
            column="decodable", value_set=[True], mostly=1.0 - cfg.max_bad_fraction, severity=CRITICAL
        ),
    ]
    if cfg.expected_classes:
        expectations.append(
            x.ExpectColumnDistinctValuesToEqualSet(
                column="label", value_set=sorted(cfg.expected_classes), severity=CRITICAL
            )
        )
    return expectations


def image_expectations(cfg: ValidateConfig) -> list[Any]:
    """Expectations over decodable images; offenders are quarantined, so these warn."""
    import great_expectations as gx

    x = gx.expectations
    return [
        x.ExpectColumnValuesToBeBetween(
            column="width", min_value=cfg.min_side, max_value=cfg.max_side, severity=WARNING
        ),
        x.ExpectColumnValuesToBeBetween(
            column="height", min_value=cfg.min_side, max_value=cfg.max_side, severity=WARNING
        ),
        x.ExpectColumnValuesToBeInSet(column="format", value_set=cfg.allowed_formats, severity=WARNING),
        x.ExpectColumnValuesToBeInSet(column="mode", value_set=cfg.allowed_modes, severity=WARNING),
        # Exact duplicates in one class are legal; split keeps copies on one side.
        x.ExpectColumnValuesToBeUnique(column="sha256", severity=WARNING),
        x.ExpectColumnValuesToNotBeNull(column="phash", severity=WARNING),
    ]


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        return {
            "unexpected_count": result["unexpected_count"],
            "unexpected_percent": round(float(result.get("unexpected_percent") or 0.0), 4),
            "examples": [str(v) for v in result.get("partial_unexpected_list", [])[:5]],
        }
    return None


def _as_check(suite: str, validation: Any) -> Check:
    config = validation.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in {"batch_id", "column"}}
    column = config.kwargs.get("column")
    name = f"{suite}.{config.type}" + (f"[{column}]" if column else "")
    return Check(
        name=name,
        source="great_expectations",
        blocking=FailureSeverity(config.severity) == CRITICAL,
        passed=bool(validation.success),
        observed=_observed(validation.result or {}),
        expected=kwargs,
    )


def _data_docs_site(context: Any, folder: Path) -> None:
    # The ephemeral context's default site is a temp folder that is never cleaned up.
    for site in context.get_site_names():
        context.delete_data_docs_site(site)
    if folder.exists():
        shutil.rmtree(folder)
    context.add_data_docs_site(
        site_name="reports",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )


def run_suites(manifest: pd.DataFrame, cfg: ValidateConfig, data_docs: Path) -> list[Check]:
    """Run both suites through GX checkpoints and render Data Docs into `data_docs`.

    Args:
        manifest: the ingest manifest.
        cfg: the `validate` section.
        data_docs: folder for the HTML site (replaced on every run).

    Returns:
        One Check per expectation.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _data_docs_site(context, data_docs)
    source = context.data_sources.add_pandas("manifest")
    images = manifest[manifest["decodable"]].reset_index(drop=True)
    checks: list[Check] = []
    for suite_name, expectations, frame in (
        ("manifest", manifest_expectations(cfg), manifest),
        ("images", image_expectations(cfg), images),
    ):
        batch = source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=suite_name,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["reports"])],
                result_format={"result_format": "SUMMARY"},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        for suite_result in result.run_results.values():
            checks.extend(_as_check(suite_name, v) for v in suite_result.results)
    return checks
