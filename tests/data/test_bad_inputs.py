"""A class-per-folder tree salted with every kind of bad and odd file, through ingest, validate, split."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import ingest, split, validate
from pipeline.errors import DataValidationError
from tests.conftest import digit_images, tree_digest, write_tree

pytestmark = pytest.mark.slow

BAD = {
    "cats/empty.jpg": "empty",
    "cats/truncated.jpg": "truncated",
    "cats/error_page.jpg": "not_an_image",
    "dogs/notes.txt": "not_an_image",
    "dogs/huge.png": "oversize",
}
ODD_BUT_VALID = {
    "cats/sixteen_bit.png": "I;16",
    "cats/cmyk.jpg": "CMYK",
    "dogs/alpha.png": "RGBA",
    "dogs/mon chien été ñ.png": "L",
}


def jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def salted_tree(root: Path) -> Path:
    """Two healthy classes of 12 digits, the salt, a duplicated image and a one-image class."""
    tree = digit_images(per_class=13, classes=3)
    write_tree(root, {"cats": tree["0"][:12], "dogs": tree["1"][:12]})
    spare = tree["2"]
    (root / "cats" / "empty.jpg").write_bytes(b"")
    whole = jpeg(np.stack([spare[0]] * 3, axis=-1))
    (root / "cats" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "cats" / "error_page.jpg").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    (root / "dogs" / "notes.txt").write_text("labels were checked by hand\n")
    Image.fromarray(spare[1].astype(np.uint16) * 257).save(root / "cats" / "sixteen_bit.png")
    (root / "cats" / "cmyk.jpg").write_bytes(jpeg(np.stack([spare[2]] * 3, axis=-1), "CMYK"))
    Image.fromarray(np.stack([spare[3]] * 4, axis=-1)).save(root / "dogs" / "alpha.png")
    Image.fromarray(spare[4]).save(root / "dogs" / "mon chien été ñ.png")
    Image.new("L", (12000, 12000)).save(root / "dogs" / "huge.png")
    shutil.copy(root / "cats" / "img_000.png", root / "dogs" / "same_as_a_cat.png")
    (root / "birds").mkdir()
    Image.fromarray(spare[5]).save(root / "birds" / "only.png")
    return root


@pytest.fixture
def salted(tmp_path: Path, make_config):
    source = salted_tree(tmp_path / "incoming")
    cfg, paths = make_config(
        {
            "ingest": {"source": "folder", "folder": {"path": str(source)}},
            "validate": {"min_images_per_class": 5},
        }
    )
    return source, cfg, paths


def quarantine_reasons(paths) -> dict[str, str]:
    frame = pd.read_csv(paths.quarantine, dtype=str, keep_default_na=False)
    return {f.removeprefix("data/raw/"): r for f, r in zip(frame["file"], frame["reason"], strict=True)}


def test_salted_tree_is_quarantined_and_lonely_class_blocks(salted):
    source, cfg, paths = salted
    before = tree_digest(source)

    result = ingest.run(cfg, paths)
    assert result.files == 24 + len(BAD) + len(ODD_BUT_VALID) + 2
    raw_after_ingest = tree_digest(paths.raw)

    with pytest.raises(DataValidationError) as failure:
        validate.run(cfg, paths)
    message = str(failure.value)
    assert "class 'birds' has 1 usable image" in message
    assert "cats" not in message and "dogs" not in message

    reasons = quarantine_reasons(paths)
    for file, reason in BAD.items():
        assert reasons[file] == reason, file
    assert reasons["cats/img_000.png"] == reasons["dogs/same_as_a_cat.png"] == "label_conflict"
    assert set(reasons) == set(BAD) | {"cats/img_000.png", "dogs/same_as_a_cat.png"}

    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False).set_index("path")
    for file, mode in ODD_BUT_VALID.items():
        row = manifest.loc[f"data/raw/{file}"]
        assert row["decodable"] == "True" and row["mode"] == mode, file
    assert manifest.loc["data/raw/dogs/huge.png", "phash"] == ""  # never decoded

    report = paths.validation_report.read_text()
    assert '"passed": false' in report
    assert (paths.data_docs / "index.html").is_file()
    assert tree_digest(source) == before
    assert tree_digest(paths.raw) == raw_after_ingest


def test_without_the_lonely_class_everything_flows_through(salted):
    source, cfg, paths = salted
    shutil.rmtree(source / "birds")
    ingest.run(cfg, paths)
    raw_digest = tree_digest(paths.raw)

    outcome = validate.run(cfg, paths)
    assert outcome.passed and outcome.quarantined == len(BAD) + 2

    counts = split.run(cfg, paths).counts
    assert sum(counts.values()) == outcome.accepted == 24 + len(ODD_BUT_VALID) - 1
    used = pd.concat(pd.read_csv(paths.split_file(n), dtype=str) for n in ("train", "val", "test"))
    assert "data/raw/dogs/mon chien été ñ.png" in set(used["path"])
    assert not set(used["path"]) & {f"data/raw/{f}" for f in BAD}
    assert tree_digest(paths.raw) == raw_digest
