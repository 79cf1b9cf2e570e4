"""Which files cannot be used, and why: a pure function of the manifest and thresholds."""

from __future__ import annotations

import pandas as pd

from pipeline.config import ValidateConfig

QUARANTINE_COLUMNS = ["file", "label", "reason", "detail"]


def _row_problem(row: pd.Series, cfg: ValidateConfig) -> tuple[str, str] | None:
    if row["error"]:
        reason, _, detail = str(row["error"]).partition(":")
        return reason, detail.strip()
    if row["format"] not in cfg.allowed_formats:
        return "format_not_allowed", f"{row['format']} is not in validate.allowed_formats"
    if row["mode"] not in cfg.allowed_modes:
        return "mode_not_allowed", f"{row['mode']} is not in validate.allowed_modes"
    sides = (int(row["width"]), int(row["height"]))
    if min(sides) < cfg.min_side or max(sides) > cfg.max_side:
        return (
            "size_out_of_bounds",
            f"{sides[0]}x{sides[1]} is outside validate.min_side..max_side ({cfg.min_side}..{cfg.max_side})",
        )
    return None


def label_conflicts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Decodable files whose exact content (sha256) is filed under more than one label."""
    images = manifest[manifest["decodable"]]
    labels = images.groupby("sha256")["label"].agg(lambda s: sorted(set(s)))
    conflicted = labels[labels.map(len) > 1]
    rows = images[images["sha256"].isin(conflicted.index)]
    return pd.DataFrame(
        {
            "file": rows["path"],
            "label": rows["label"],
            "reason": "label_conflict",
            "detail": [f"the same image is filed under labels {conflicted[h]}" for h in rows["sha256"]],
        },
        columns=QUARANTINE_COLUMNS,
    )


def find_quarantine(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """Every unusable file with a reason, sorted by path.

    Reasons: the ingest error codes (empty, not_an_image, truncated,
    undecodable, oversize), then format_not_allowed, mode_not_allowed,
    size_out_of_bounds, and label_conflict for content filed under two labels.

    Args:
        manifest: the ingest manifest.
        cfg: the `validate` section.

    Returns:
        A frame with columns file, label, reason, detail.
    """
    problems = []
    for _, row in manifest.iterrows():
        problem = _row_problem(row, cfg)
        if problem:
            problems.append(
                {"file": row["path"], "label": row["label"], "reason": problem[0], "detail": problem[1]}
            )
    per_file = pd.DataFrame(problems, columns=QUARANTINE_COLUMNS)
    usable = manifest[~manifest["path"].isin(per_file["file"])]
    frames = [frame for frame in (per_file, label_conflicts(usable)) if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return pd.concat(frames).sort_values("file", kind="stable").reset_index(drop=True)
