import numpy as np
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
    train = frame.drop(frame.index[::4])
    frame.iloc[::4].to_csv(paths.split_file("test"), index=False)
    train.to_csv(paths.split_file("train"), index=False)
    result = baseline.run(cfg, paths)
    assert result.accuracy >= 0.9
    report = pd.read_json(paths.baseline_report, typ="series")
    assert report["train_images"] == 45 and report["test_images"] == 15
    assert report["hog_features"] == 7 * 7 * 2 * 2 * 9  # params.yaml's HOG, as in the test above
    # PCA keeps the fewest components whose share of the standardised features' variance exceeds
    # pca_variance; here from the singular values with numpy, not from scikit-learn's PCA.
    features = baseline.hog_features(list(train["path"]), paths.root, cfg.baseline).astype(np.float64)
    spread = features.std(axis=0)
    scaled = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    variance = np.linalg.svd(scaled, compute_uv=False) ** 2
    share = np.cumsum(variance) / variance.sum()
    assert report["pca_components"] == np.count_nonzero(share <= cfg.baseline.pca_variance) + 1
