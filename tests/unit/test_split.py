import json
import shutil

import pandas as pd
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import SplitError
from pipeline.split import assign_splits, duplicate_groups
from tests.conftest import digit_images, write_tree


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
    report = json.loads(paths.split_report.read_text())
    split.run(cfg, paths)  # a rerun keeps the ledger: the same files, no image new
    assert {n: paths.split_file(n).read_bytes() for n in ("train", "val", "test")} == first
    again = json.loads(paths.split_report.read_text())
    assert (report["new_images"], again["new_images"], again["kept_images"]) == (60, 0, 60)
    changes = ("new_images", "new_images_to", "kept_images")
    assert {k: v for k, v in again.items() if k not in changes} == {
        k: v for k, v in report.items() if k not in changes
    }
    shutil.rmtree(paths.splits)  # and from scratch, the same bytes again
    split.run(cfg, paths)
    assert {n: paths.split_file(n).read_bytes() for n in ("train", "val", "test")} == first
    rows = sum(len(b.splitlines()) - 1 for b in first.values())
    assert rows == 60


def test_adding_a_batch_moves_no_image_and_keeps_the_ratios(tmp_path):
    from pipeline.split import stable_assignment

    first = frame(60)
    first["group"] = duplicate_groups(first, True)
    first["split"] = assign_splits(first, SplitConfig())
    prior = dict(zip(first["sha256"], first["split"], strict=True))
    batch = frame(90)  # 30 new images per class, after the 60 known ones
    batch["group"] = duplicate_groups(batch, True)
    sides, summary = stable_assignment(batch, SplitConfig(), prior)
    known = batch["sha256"].isin(prior)
    assert (sides[known] == batch.loc[known, "sha256"].map(prior)).all()  # nobody moved
    assert summary["new_images"] == 90 and summary["moved_images"] == 0 and summary["kept_images"] == 180
    assert sum(summary["new_images_to"].values()) == 90
    for label in "abc":
        counts = sides[batch["label"] == label].value_counts()
        for name, ratio in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
            assert abs(counts[name] - ratio * 90) <= 1, (label, name, counts.to_dict())


def test_a_new_duplicate_joins_its_group_and_groups_never_cross_splits():
    from pipeline.split import stable_assignment

    first = frame(40)
    first["group"] = duplicate_groups(first, True)
    first["split"] = assign_splits(first, SplitConfig())
    prior = dict(zip(first["sha256"], first["split"], strict=True))
    test_image = first[first["split"] == "test"].iloc[0]
    twin = pd.DataFrame(  # a near-duplicate of a test image arrives later
        [{"path": "z/twin.png", "label": test_image["label"], "sha256": "new", "phash": test_image["phash"]}]
    )
    grown = pd.concat([first.drop(columns=["group", "split"]), twin], ignore_index=True)
    grown["group"] = duplicate_groups(grown, True)
    sides, summary = stable_assignment(grown, SplitConfig(), prior)
    assert sides[grown["sha256"] == "new"].item() == "test"
    assert (pd.DataFrame({"g": grown["group"], "s": sides}).groupby("g")["s"].nunique() == 1).all()
    assert summary["new_images_to"]["test"] == 1 and summary["moved_images"] == 0


def test_the_same_images_in_another_order_get_the_same_splits():
    from pipeline.split import stable_assignment

    first = frame(40)
    first["group"] = duplicate_groups(first, True)
    prior = dict(zip(first["sha256"], assign_splits(first, SplitConfig()), strict=True))
    batch = frame(70)
    shuffled = batch.sample(frac=1.0, random_state=3).reset_index(drop=True)
    results = []
    for rows in (batch, shuffled):
        rows = rows.copy()
        rows["group"] = duplicate_groups(rows, True)
        sides, _ = stable_assignment(rows, SplitConfig(), prior)
        results.append(dict(zip(rows["sha256"], sides, strict=True)))
    assert results[0] == results[1]


def test_split_runs_keep_the_ledger_and_a_new_seed_starts_over(make_config, small_tree):
    from pipeline import ingest, split, validate
    from pipeline.artifacts import read_split

    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}})
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)
    before = {n: set(read_split(paths, n)["sha256"]) for n in ("train", "val", "test")}
    extra = digit_images(per_class=30)  # 10 more of each class than the source holds
    write_tree(small_tree, {label: images[20:] for label, images in extra.items()}, suffix="_new.png")
    ingest.run(cfg, paths)
    validate.run(cfg, paths)
    split.run(cfg, paths)
    after = {n: set(read_split(paths, n)["sha256"]) for n in ("train", "val", "test")}
    assert all(before[n] <= after[n] for n in before)  # every image kept its split
    report = json.loads(paths.split_report.read_text())
    assert report["new_images"] == 30 and report["kept_images"] == 60 and report["moved_images"] == 0
    (paths.splits / "assignment.json").unlink()  # split files from before the ledger are adopted
    split.run(cfg, paths)
    adopted = json.loads(paths.split_report.read_text())
    assert (adopted["new_images"], adopted["kept_images"]) == (0, 90)
    assert {n: set(read_split(paths, n)["sha256"]) for n in ("train", "val", "test")} == after
    reseeded, _ = make_config(
        {"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}, "split": {"seed": 7}}
    )
    split.run(reseeded, paths)
    assert json.loads(paths.split_report.read_text())["new_images"] == 90
