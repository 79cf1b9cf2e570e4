import pandas as pd
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import SplitError
from pipeline.split import assign_splits, duplicate_groups


def frame(n_per_class: int, classes: str = "abc") -> pd.DataFrame:
    rows = [
        {"path": f"{c}/{i:03d}.png", "label": c, "sha256": f"{c}{i}", "phash": f"p{c}{i}"}
        for c in classes
        for i in range(n_per_class)
    ]
    return pd.DataFrame(rows)


def test_groups_join_exact_and_near_duplicates_transitively():
    data = pd.DataFrame(
        {
            "sha256": ["s1", "s1", "s2", "s3", "s4"],
            "phash": ["p1", "p2", "p2", "p3", ""],
        }
    )
    assert duplicate_groups(data, near_duplicates=True) == [0, 0, 0, 3, 4]
    assert duplicate_groups(data, near_duplicates=False) == [0, 0, 2, 3, 4]


def test_ratios_hold_per_class():
    data = frame(100)
    data["group"] = duplicate_groups(data, True)
    sides = assign_splits(data, SplitConfig())
    for label in "abc":
        counts = sides[data["label"] == label].value_counts()
        assert (counts["train"], counts["val"], counts["test"]) == (70, 20, 10)


def test_duplicates_never_cross_splits():
    data = frame(60)
    # every 5th image has a near-duplicate partner (same perceptual hash) in the same class
    for i in range(0, 60, 5):
        data.loc[data["path"] == f"a/{i + 1:03d}.png", "phash"] = f"pa{i}"
    data.loc[data["path"] == "b/000.png", "sha256"] = "b1"  # exact duplicate of b/001
    data["group"] = duplicate_groups(data, True)
    data["split"] = assign_splits(data, SplitConfig())
    assert (data.groupby("group")["split"].nunique() == 1).all()
    assert data["group"].nunique() < len(data)


def test_seed_changes_assignment_and_is_deterministic():
    data = frame(50)
    data["group"] = duplicate_groups(data, True)
    first = assign_splits(data, SplitConfig(seed=1))
    assert first.equals(assign_splits(data, SplitConfig(seed=1)))
    assert not first.equals(assign_splits(data, SplitConfig(seed=2)))


def test_class_too_small_to_stratify_is_named():
    data = pd.concat([frame(30, "ab"), frame(2, "z")])
    data["group"] = duplicate_groups(data, True)
    with pytest.raises(SplitError, match=r"class\(es\) 'z' \(2\)"):
        assign_splits(data.reset_index(drop=True), SplitConfig())


def test_split_files_are_byte_identical_across_runs(make_config, small_tree):
    from pipeline import ingest, split
    from pipeline.validate.quarantine import QUARANTINE_COLUMNS

    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}})
    ingest.run(cfg, paths)
    pd.DataFrame(columns=QUARANTINE_COLUMNS).to_csv(paths.quarantine, index=False)
    split.run(cfg, paths)
    first = {n: paths.split_file(n).read_bytes() for n in ("train", "val", "test")}
    report = paths.split_report.read_bytes()
    split.run(cfg, paths)
    assert {n: paths.split_file(n).read_bytes() for n in ("train", "val", "test")} == first
    assert paths.split_report.read_bytes() == report
    rows = sum(len(b.splitlines()) - 1 for b in first.values())
    assert rows == 60
