import pandas as pd

from pipeline import baseline
from pipeline.config import BaselineConfig


def test_hog_features_have_the_configured_shape(small_tree, make_config):
    _, paths = make_config()
    files = [p.relative_to(paths.root).as_posix() for p in sorted(small_tree.rglob("*.png"))[:3]]
    features = baseline.hog_features(
        files, paths.root, BaselineConfig(image_size=32, pixels_per_cell=4, cells_per_block=2, orientations=9)
    )
    # (32/4 - 2 + 1)^2 blocks x 2x2 cells x 9 orientations
    assert features.shape == (3, 7 * 7 * 2 * 2 * 9)


def test_baseline_learns_digits(small_tree, make_config):
    cfg, paths = make_config()
    rows = [
        {"path": p.relative_to(paths.root).as_posix(), "label": p.parent.name}
        for p in sorted(small_tree.rglob("*.png"))
    ]
    frame = pd.DataFrame(rows)
    paths.splits.mkdir(parents=True)
    frame.iloc[::4].to_csv(paths.split_file("test"), index=False)
    frame.drop(frame.index[::4]).to_csv(paths.split_file("train"), index=False)
    result = baseline.run(cfg, paths)
    assert result.accuracy >= 0.9
    report = pd.read_json(paths.baseline_report, typ="series")
    assert report["test_images"] == 15 and report["pca_components"] >= 1
