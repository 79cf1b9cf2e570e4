"""The landing area: reading batches, waiting for uploads to settle, moving batches aside without loss."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.errors import IngestError
from pipeline.monitoring import landing
from tests.conftest import digit_images, tree_digest, write_tree


def test_labelled_and_unlabelled_batches(tmp_path: Path):
    labelled = write_tree(tmp_path / "in" / "b1", digit_images(per_class=3, classes=2))
    (labelled / "notes.txt").write_text("from the field team")
    batch = landing.read_batch(labelled)
    assert batch.labelled and sorted(set(batch.labels or [])) == ["0", "1"] and len(batch.files) == 6
    assert [p.name for p in batch.ignored] == ["notes.txt"]

    loose = tmp_path / "in" / "b2"
    for path in write_tree(tmp_path / "tmp", digit_images(per_class=2, classes=1)).rglob("*.png"):
        loose.mkdir(parents=True, exist_ok=True)
        path.rename(loose / path.name)
    unlabelled = landing.read_batch(loose)
    assert not unlabelled.labelled and len(unlabelled.files) == 2


def test_a_batch_mixing_loose_images_and_class_folders_is_refused_by_name(tmp_path: Path):
    mixed = write_tree(tmp_path / "mixed", digit_images(per_class=2, classes=1))
    (mixed / "0" / "img_000.png").rename(mixed / "loose.png")
    with pytest.raises(IngestError, match="mixed.*loose images"):
        landing.read_batch(mixed)
    with pytest.raises(IngestError, match="no images"):
        (tmp_path / "empty").mkdir()
        landing.read_batch(tmp_path / "empty")


def test_only_settled_batches_are_ready(tmp_path: Path):
    old = write_tree(tmp_path / "landing" / "old", digit_images(per_class=1, classes=1))
    past = time.time() - 600
    for path in [old, *old.rglob("*")]:
        os.utime(path, (past, past))
    write_tree(tmp_path / "landing" / "uploading", digit_images(per_class=1, classes=1))
    (tmp_path / "landing" / ".lock-dir").mkdir()
    assert [p.name for p in landing.ready_batches(tmp_path / "landing", 60)] == ["old"]
    assert len(landing.ready_batches(tmp_path / "landing", 0)) == 2


def test_moving_aside_never_overwrites(tmp_path: Path):
    first = write_tree(tmp_path / "landing" / "b", digit_images(per_class=2, classes=1))
    digest = tree_digest(first)
    kept = landing.move_aside(first, tmp_path / "archive", landing.PROCESSED)
    assert kept == tmp_path / "archive" / "processed" / "b" and tree_digest(kept) == digest
    again = write_tree(tmp_path / "landing" / "b", digit_images(per_class=1, classes=1))
    second = landing.move_aside(again, tmp_path / "archive", landing.PROCESSED)
    assert second != kept and second.name.startswith("b-") and tree_digest(kept) == digest
    assert not (tmp_path / "landing" / "b").exists()
