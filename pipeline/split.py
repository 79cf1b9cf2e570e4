"""split: stratified train/val/test over duplicate groups, so no image leaks across splits.

Assignment is stable: an image keeps its split for its whole life. The split
files of the last run (kept by DVC: `persist: true`) are the ledger, keyed by
each image's sha256; only images not in it are assigned, stratified among
themselves so that every class's split sizes stay as close to the ratios as
the kept images allow (within one image per class when nothing was removed).
A champion is then always compared on test images neither it nor the
candidate trained on. Changing `split.seed` or `split.ratios` starts a new
ledger (every image reassigned), and says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
LEDGER = "assignment.json"  # next to the split files: the seed and ratios their assignment used
# When a new image joins images of several splits into one duplicate group, the group takes the
# split most of its images had; ties go to the split whose contents matter most for comparisons.
TIE_ORDER = ("test", "val", "train")


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


def previous_assignment(paths: StagePaths, cfg: SplitConfig) -> dict[str, str]:
    """sha256 -> split from the last run's split files, if they were made with this seed and ratios."""
    ledger = paths.splits / LEDGER
    existing = [paths.split_file(name) for name in SPLITS if paths.split_file(name).is_file()]
    if not existing:
        return {}  # a first split; after a fresh clone, `dvc pull` restores the ledger first
    if not ledger.is_file():  # split files from before the ledger: adopt them rather than reshuffle
        log.warning(
            "%s has split files but no %s: keeping their assignment as if made with this seed and ratios",
            paths.relative(paths.splits),
            LEDGER,
        )
    elif json.loads(ledger.read_text(encoding="utf-8")) != ledger_entry(cfg):
        recorded = json.loads(ledger.read_text(encoding="utf-8"))
        log.warning(
            "split settings changed (%s -> %s): every image is reassigned", recorded, ledger_entry(cfg)
        )
        return {}
    prior: dict[str, str] = {}
    for file in existing:
        rows = pd.read_csv(file, dtype=str, keep_default_na=False)
        prior.update(dict.fromkeys(rows["sha256"], file.stem))
    return prior


def ledger_entry(cfg: SplitConfig) -> dict:
    """The settings an assignment depends on; a change to any of them starts a new ledger."""
    return {
        "seed": cfg.seed,
        "ratios": cfg.ratios.model_dump(),
        "group_near_duplicates": cfg.group_near_duplicates,
    }


def _targets(total: int, cfg: SplitConfig) -> dict[str, int]:
    """Split sizes for `total` groups by the ratios, largest remainder first (sum is exact)."""
    ratios = cfg.ratios.model_dump()
    raw = {name: ratios[name] * total for name in SPLITS}
    sizes = {name: int(raw[name]) for name in SPLITS}
    for name in sorted(SPLITS, key=lambda n: (-(raw[n] - sizes[n]), TIE_ORDER.index(n))):
        if sum(sizes.values()) >= total:
            break
        sizes[name] += 1
    return sizes


def stable_assignment(frame: pd.DataFrame, cfg: SplitConfig, prior: dict[str, str]) -> tuple[pd.Series, dict]:
    """Keep every known image's split; assign new duplicate groups per class toward the ratios.

    Args:
        frame: accepted rows with `group`, `label` and `sha256` columns.
        cfg: the `split` section (its seed orders the new groups).
        prior: sha256 -> split of the images assigned before.

    Returns:
        The split of each row (aligned with `frame`), and what happened: new images and where
        they went, images kept, images moved because a new duplicate joined their group to another.
    """
    labels = group_labels(frame)
    check_stratifiable(
        labels, cfg
    )  # a new class needs as many groups as there are splits, as on a first split
    known = frame["sha256"].map(prior)
    side: dict[int, str] = {}
    moved = 0
    for group, splits in known.groupby(frame["group"]):
        votes = splits.dropna().value_counts()
        if votes.empty:
            continue
        best = sorted(votes.items(), key=lambda kv: (-kv[1], TIE_ORDER.index(kv[0])))[0][0]
        side[int(group)] = best
        moved += int((splits.dropna() != best).sum())
    rng = np.random.default_rng(cfg.seed)
    first_sha = frame.groupby("group")["sha256"].min()
    for label in sorted(labels.unique()):
        groups = labels.index[labels == label]
        new = sorted((g for g in groups if g not in side), key=lambda g: first_sha[g])
        counts = {name: sum(1 for g in groups if side.get(g) == name) for name in SPLITS}
        targets = _targets(len(groups), cfg)
        for group in (new[i] for i in rng.permutation(len(new))):
            name = max(SPLITS, key=lambda n: (targets[n] - counts[n], -TIE_ORDER.index(n)))
            side[int(group)] = name
            counts[name] += 1
    assigned = frame["group"].map(side)
    fresh = known.isna()
    summary = {
        "new_images": int(fresh.sum()),
        "new_images_to": {name: int((assigned[fresh] == name).sum()) for name in SPLITS},
        "kept_images": int((~fresh).sum()) - moved,
        "moved_images": moved,
    }
    return assigned, summary


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
    prior = previous_assignment(paths, cfg)
    if prior:
        frame["split"], changes = stable_assignment(frame, cfg, prior)
    else:  # a first split (or a new seed or ratios): stratified over everything
        frame["split"] = assign_splits(frame, cfg)
        changes = {
            "new_images": len(frame),
            "new_images_to": {name: int((frame["split"] == name).sum()) for name in SPLITS},
            "kept_images": 0,
            "moved_images": 0,
        }
    paths.splits.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        rows = frame[frame["split"] == name][SPLIT_COLUMNS]
        rows.to_csv(paths.split_file(name), index=False, lineterminator="\n", encoding="utf-8")
    write_report(ledger_entry(cfg), paths.splits / LEDGER)
    report = {**build_report(frame, cfg), **changes}
    write_report(report, paths.split_report)
    log.info("split %s -> %s", report["totals"], paths.relative(paths.splits))
    return SplitResult(counts=report["totals"], report=paths.split_report)
