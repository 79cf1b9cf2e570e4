"""Dataset checks Great Expectations cannot express: counts per class after quarantine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.config import ValidateConfig


@dataclass(frozen=True)
class Check:
    """One check's outcome, as written to reports/validation.json."""

    name: str
    source: str
    blocking: bool
    passed: bool
    observed: Any
    expected: Any
    message: str = ""


def accepted_class_counts(manifest: pd.DataFrame, accepted: pd.DataFrame) -> dict[str, int]:
    """Accepted images per class, including classes whose every file was quarantined (count 0)."""
    counts = accepted["label"].value_counts()
    return {label: int(counts.get(label, 0)) for label in sorted(manifest["label"].unique())}


def min_images_per_class(counts: dict[str, int], cfg: ValidateConfig) -> Check:
    """Blocking: every class keeps at least `min_images_per_class` accepted images."""
    short = {label: n for label, n in counts.items() if n < cfg.min_images_per_class}
    message = "; ".join(
        f"class '{label}' has {n} usable image{'s' if n != 1 else ''}, needs at least "
        f"{cfg.min_images_per_class} (validate.min_images_per_class): add images or remove the class folder"
        for label, n in short.items()
    )
    return Check(
        "dataset.min_images_per_class",
        "custom",
        True,
        not short,
        observed=short or min(counts.values(), default=0),
        expected={"min_value": cfg.min_images_per_class},
        message=message,
    )


def class_imbalance(counts: dict[str, int], cfg: ValidateConfig) -> Check:
    """Warning: the largest class is at most `max_imbalance_ratio` times the smallest."""
    present = [n for n in counts.values() if n > 0]
    ratio = max(present) / min(present) if present else 0.0
    passed = ratio <= cfg.max_imbalance_ratio
    message = (
        ""
        if passed
        else (
            f"largest class is {ratio:.1f}x the smallest (validate.max_imbalance_ratio "
            f"{cfg.max_imbalance_ratio:g}); consider class weights or more data for small classes"
        )
    )
    return Check(
        "dataset.class_imbalance_ratio",
        "custom",
        False,
        passed,
        observed=round(ratio, 4),
        expected={"max_value": cfg.max_imbalance_ratio},
        message=message,
    )


def dataset_checks(manifest: pd.DataFrame, accepted: pd.DataFrame, cfg: ValidateConfig) -> list[Check]:
    """All custom checks over the accepted images."""
    counts = accepted_class_counts(manifest, accepted)
    return [min_images_per_class(counts, cfg), class_imbalance(counts, cfg)]
