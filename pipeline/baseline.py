"""baseline: the classical route, HOG features -> PCA (95% variance) -> RBF SVM, on the same splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.feature import hog
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipeline.artifacts import read_split, write_report
from pipeline.config import BaselineConfig, PipelineConfig
from pipeline.ingest.images import luminance
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineResult:
    """Test-split scores of the classical model."""

    accuracy: float
    macro_f1: float


def hog_features(paths: list[str], root, cfg: BaselineConfig) -> np.ndarray:
    """HOG descriptors of grayscale images resized to image_size x image_size."""
    features = []
    for path in paths:
        with Image.open(root / path) as image:
            gray = luminance(image).resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
        features.append(
            hog(
                np.asarray(gray, dtype=np.float32) / 255.0,
                orientations=cfg.orientations,
                pixels_per_cell=(cfg.pixels_per_cell,) * 2,
                cells_per_block=(cfg.cells_per_block,) * 2,
            )
        )
    return np.stack(features)


def baseline_model(cfg: BaselineConfig) -> Pipeline:
    """Standardise, PCA keeping `pca_variance` of the variance, RBF SVM."""
    return make_pipeline(
        StandardScaler(),
        PCA(n_components=cfg.pca_variance, random_state=cfg.seed),
        SVC(kernel="rbf", C=cfg.svm_c, gamma="scale", random_state=cfg.seed),
    )


def run(config: PipelineConfig, paths: StagePaths) -> BaselineResult:
    """Fit on the train split, score on the test split, write reports/baseline.json."""
    cfg = config.baseline
    train, test = read_split(paths, "train"), read_split(paths, "test")
    model = baseline_model(cfg).fit(hog_features(list(train["path"]), paths.root, cfg), train["label"])
    predicted = model.predict(hog_features(list(test["path"]), paths.root, cfg))
    report = {
        "accuracy": float(accuracy_score(test["label"], predicted)),
        "macro_f1": float(f1_score(test["label"], predicted, average="macro")),
        "pca_components": int(model.named_steps["pca"].n_components_),
        "hog_features": int(model.named_steps["standardscaler"].n_features_in_),
        "train_images": len(train),
        "test_images": len(test),
    }
    write_report(report, paths.baseline_report)
    log.info(
        "baseline HOG+PCA+SVM: test accuracy %.4f (%d PCA components)",
        report["accuracy"],
        report["pca_components"],
    )
    return BaselineResult(report["accuracy"], report["macro_f1"])
