"""split: stratified train/val/test over duplicate groups, so no image leaks across splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.artifacts import write_report
from pipeline.config import PipelineConfig, SplitConfig
from pipeline.errors import SplitError
from pipeline.manifest import read_manifest
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "label", "sha256", "group"]


@dataclass(frozen=True)
class SplitResult:
    """Images per split."""

    counts: dict[str, int]
    report: Path


def duplicate_groups(frame: pd.DataFrame, near_duplicates: bool) -> list[int]:
    """Connected components of images sharing a sha256 (or a perceptual hash when asked).

    Written by hand: a small union-find over hash keys; no library here groups rows
    by any-of-several shared keys. Each group is numbered by its first row.

    Returns:
        The group number of each row, in row order.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    row_keys = []
    for row in frame.itertuples():
        keys = [f"sha:{row.sha256}"] + ([f"phash:{row.phash}"] if near_duplicates and row.phash else [])
        row_keys.append(keys)
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    first_row: dict[str, int] = {}
    return [first_row.setdefault(find(keys[0]), index) for index, keys in enumerate(row_keys)]


def group_labels(frame: pd.DataFrame) -> pd.Series:
    """The label each group is stratified by: its most common label, ties broken by name."""
    return frame.groupby("group")["label"].agg(
        lambda s: sorted(s.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    )


def check_stratifiable(labels: pd.Series, cfg: SplitConfig) -> None:
    """Raise a clear error when a class has fewer groups than there are non-empty splits."""
    needed = sum(1 for ratio in (cfg.ratios.train, cfg.ratios.val, cfg.ratios.test) if ratio > 0)
    counts = labels.value_counts()
    short = counts[counts < needed]
    if not short.empty:
        named = ", ".join(f"'{label}' ({n})" for label, n in short.sort_index().items())
        raise SplitError(
            f"cannot stratify: class(es) {named} have fewer distinct images than the {needed} "
            "splits; add images or raise validate.min_images_per_class so validation catches it"
        )


def assign_splits(frame: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Which split each row goes to: stratified by class over duplicate groups, seeded.

    Args:
        frame: accepted rows with a `group` column, sorted by path.
        cfg: the `split` section.

    Returns:
        A Series of 'train' / 'val' / 'test' aligned with `frame`.
    """
    labels = group_labels(frame)
    check_stratifiable(labels, cfg)
    ratios = cfg.ratios
    # Absolute counts: fractions like 0.2 / 0.9 round up past the intended size.
    n_test, n_val = round(ratios.test * len(labels)), round(ratios.val * len(labels))
    try:
        rest, test = train_test_split(labels.index, test_size=n_test, stratify=labels, random_state=cfg.seed)
        val: list[int] = []
        train = rest
        if n_val > 0:
            train, val = train_test_split(
                rest, test_size=n_val, stratify=labels.loc[rest], random_state=cfg.seed
            )
    except ValueError as error:
        raise SplitError(f"cannot split with split.ratios {ratios.model_dump()}: {error}") from None
    side = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}
    return frame["group"].map(side)


def build_report(frame: pd.DataFrame, cfg: SplitConfig) -> dict:
    """Counts per class per split, and how many images were held together as duplicates."""
    sizes = frame.groupby("group").size()
    counts = {
        name: {
            label: int(n)
            for label, n in frame[frame["split"] == name]["label"].value_counts().sort_index().items()
        }
        for name in SPLITS
    }
    totals = {name: sum(counts[name].values()) for name in SPLITS}
    return {
        "seed": cfg.seed,
        "ratios": cfg.ratios.model_dump(),
        "totals": totals,
        "fractions": {name: round(totals[name] / len(frame), 4) for name in SPLITS},
        "counts": counts,
        "duplicate_groups": int((sizes > 1).sum()),
        "images_in_duplicate_groups": int(sizes[sizes > 1].sum()),
    }


def accepted_images(paths: StagePaths) -> pd.DataFrame:
    """The manifest minus the quarantine list, sorted by path."""
    for needed, stage in ((paths.manifest, "ingest"), (paths.quarantine, "validate")):
        if not needed.is_file():
            raise SplitError(f"{paths.relative(needed)} not found; run `python -m pipeline {stage}` first")
    manifest = read_manifest(paths.manifest)
    quarantine = pd.read_csv(paths.quarantine, dtype=str, keep_default_na=False)
    accepted = manifest[~manifest["path"].isin(quarantine["file"]) & manifest["decodable"]]
    return accepted.sort_values("path").reset_index(drop=True)


def run(config: PipelineConfig, paths: StagePaths) -> SplitResult:
    """Split the accepted images and write one CSV per split plus reports/split.json.

    The same manifest, quarantine and config give byte-identical files.
    """
    cfg = config.split
    frame = accepted_images(paths)
    if frame.empty:
        raise SplitError(f"{paths.relative(paths.manifest)}: no accepted images to split; run validate first")
    frame["group"] = duplicate_groups(frame, cfg.group_near_duplicates)
    frame["split"] = assign_splits(frame, cfg)
    paths.splits.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        rows = frame[frame["split"] == name][SPLIT_COLUMNS]
        rows.to_csv(paths.split_file(name), index=False, lineterminator="\n", encoding="utf-8")
    report = build_report(frame, cfg)
    write_report(report, paths.split_report)
    log.info("split %s -> %s", report["totals"], paths.relative(paths.splits))
    return SplitResult(counts=report["totals"], report=paths.split_report)
