import pandas as pd

from pipeline.config import ValidateConfig
from pipeline.manifest import MANIFEST_COLUMNS
from pipeline.validate.checks import class_imbalance, min_images_per_class
from pipeline.validate.quarantine import find_quarantine


def manifest(*rows: dict) -> pd.DataFrame:
    defaults = {
        "phash": "ab",
        "width": 32,
        "height": 32,
        "mode": "L",
        "format": "PNG",
        "bytes": 10,
        "decodable": True,
        "error": "",
    }
    return pd.DataFrame([{**defaults, **row} for row in rows], columns=list(MANIFEST_COLUMNS))


def test_ingest_errors_become_reasons():
    frame = manifest(
        {"path": "a/1.jpg", "label": "a", "sha256": "1", "decodable": False, "error": "truncated: cut"},
        {"path": "a/2.png", "label": "a", "sha256": "2"},
    )
    result = find_quarantine(frame, ValidateConfig())
    assert result.to_dict("records") == [
        {"file": "a/1.jpg", "label": "a", "reason": "truncated", "detail": "cut"}
    ]


def test_bounds_formats_and_modes():
    cfg = ValidateConfig(min_side=8, max_side=100, allowed_formats=["PNG"], allowed_modes=["L", "RGB"])
    frame = manifest(
        {"path": "a/small.png", "label": "a", "sha256": "1", "width": 4},
        {"path": "a/big.png", "label": "a", "sha256": "2", "height": 101},
        {"path": "a/x.tif", "label": "a", "sha256": "3", "format": "TIFF"},
        {"path": "a/cmyk.png", "label": "a", "sha256": "4", "mode": "CMYK"},
        {"path": "a/ok.png", "label": "a", "sha256": "5"},
    )
    reasons = dict(zip(*find_quarantine(frame, cfg)[["file", "reason"]].T.values, strict=True))
    assert reasons == {
        "a/big.png": "size_out_of_bounds",
        "a/cmyk.png": "mode_not_allowed",
        "a/small.png": "size_out_of_bounds",
        "a/x.tif": "format_not_allowed",
    }


def test_same_content_under_two_labels_is_a_conflict_but_same_label_is_not():
    frame = manifest(
        {"path": "a/1.png", "label": "a", "sha256": "same"},
        {"path": "b/1.png", "label": "b", "sha256": "same"},
        {"path": "c/1.png", "label": "c", "sha256": "twin"},
        {"path": "c/2.png", "label": "c", "sha256": "twin"},
    )
    result = find_quarantine(frame, ValidateConfig())
    assert list(result["file"]) == ["a/1.png", "b/1.png"]
    assert set(result["reason"]) == {"label_conflict"}
    assert "['a', 'b']" in result["detail"][0]


def test_min_images_names_the_class_and_count():
    check = min_images_per_class({"cat": 12, "dog": 1}, ValidateConfig(min_images_per_class=10))
    assert check.blocking and not check.passed
    assert "class 'dog' has 1 usable image," in check.message and "cat" not in check.message


def test_imbalance_is_a_warning():
    check = class_imbalance({"a": 100, "b": 5}, ValidateConfig(max_imbalance_ratio=10))
    assert not check.blocking and not check.passed and check.observed == 20.0
    assert class_imbalance({"a": 50, "b": 10}, ValidateConfig(max_imbalance_ratio=10)).passed
