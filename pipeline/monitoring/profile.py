"""Profiles: what a batch looks like to the drift detectors, and the reference profile it is compared with.

A profile holds per-image statistics, the model's penultimate-layer
embeddings reduced by a PCA fitted on the reference, its softmax outputs and
the predicted (and, when known, true) labels. Images reach the model through
`pipeline.images`, as in training and serving.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.ingest.images import luminance

STATISTICS = ("brightness", "contrast", "saturation", "sharpness", "width", "height", "aspect_ratio")


def image_statistics(data: bytes) -> np.ndarray:
    """The STATISTICS of one encoded image, on its own pixels (0..1 scale, native size).

    Brightness and contrast are the mean and standard deviation of luma,
    saturation the mean HSV saturation, sharpness the variance of the luma
    Laplacian.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
        luma = np.asarray(luminance(image), dtype=np.float32) / 255.0
    return np.array(
        [
            luma.mean(),
            luma.std(),
            hsv[..., 1].mean(),
            ndimage.laplace(luma).var(),
            width,
            height,
            width / height,
        ],
        dtype=np.float64,
    )


def statistics_of(files: Sequence[Path]) -> np.ndarray:
    """(n, len(STATISTICS)) statistics of image files."""
    if not files:
        return np.zeros((0, len(STATISTICS)))
    return np.stack([image_statistics(Path(f).read_bytes()) for f in files])


def model_outputs(model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer embeddings (the input of the softmax layer) and softmax outputs."""
    import keras

    head = model.get_layer("probabilities")
    embeddings, probabilities = predict(keras.Model(model.input, [head.input, model.output]), pixels)
    return np.asarray(embeddings, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)


@dataclass(frozen=True)
class Projection:
    """PCA fitted on the reference embeddings; applied unchanged to every batch."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, dim: int) -> Projection:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(dim, *embeddings.shape), random_state=0).fit(embeddings)
        return cls(pca.mean_, pca.components_)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        return (embeddings - self.mean) @ self.components.T


@dataclass(frozen=True)
class BatchProfile:
    """What the detectors compare: statistics, reduced embeddings, softmax outputs, labels."""

    statistics: np.ndarray
    embeddings: np.ndarray
    probabilities: np.ndarray
    predicted: list[str]
    labels: list[str] | None


def profile_files(
    files: Sequence[Path],
    labels: Sequence[str] | None,
    model,
    class_names: Sequence[str],
    image_size: int,
    projection: Projection,
) -> BatchProfile:
    """Profile image files with a model, reducing embeddings with a fitted projection."""
    embeddings, probabilities = model_outputs(model, load_files(files, image_size))
    return BatchProfile(
        statistics=statistics_of(files),
        embeddings=projection(embeddings),
        probabilities=probabilities,
        predicted=[class_names[i] for i in probabilities.argmax(axis=1)],
        labels=list(labels) if labels is not None else None,
    )


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference a batch is compared with, and what is needed to profile a batch the same way."""

    profile: BatchProfile
    projection: Projection
    class_names: list[str]
    image_size: int
    test_accuracy: float
    test_images: int | None = None  # the size of the test split test_accuracy was measured on

    def save(self, folder: Path) -> None:
        """`profile.npz` (arrays) and `profile.json` (names, sizes, accuracy) under `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            folder / "profile.npz",
            statistics=self.profile.statistics,
            embeddings=self.profile.embeddings,
            probabilities=self.profile.probabilities,
            projection_mean=self.projection.mean,
            projection_components=self.projection.components,
        )
        meta = {
            "statistics": list(STATISTICS),
            "class_names": self.class_names,
            "image_size": self.image_size,
            "test_accuracy": self.test_accuracy,
            "test_images": self.test_images,
            "predicted": self.profile.predicted,
            "labels": self.profile.labels,
            "images": len(self.profile.predicted),
        }
        (folder / "profile.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> ReferenceProfile:
        """Read a profile written by `save`."""
        meta = json.loads((folder / "profile.json").read_text(encoding="utf-8"))
        arrays = np.load(folder / "profile.npz")
        return cls(
            profile=BatchProfile(
                arrays["statistics"],
                arrays["embeddings"],
                arrays["probabilities"],
                meta["predicted"],
                meta["labels"],
            ),
            projection=Projection(arrays["projection_mean"], arrays["projection_components"]),
            class_names=meta["class_names"],
            image_size=int(meta["image_size"]),
            test_accuracy=float(meta["test_accuracy"]),
            test_images=meta.get("test_images"),
        )


def build_reference(
    files: Sequence[Path],
    labels: Sequence[str],
    model,
    class_names: Sequence[str],
    image_size: int,
    dim: int,
    test_accuracy: float,
    test_images: int | None = None,
) -> ReferenceProfile:
    """Profile held-out images and fit the embedding projection on them."""
    embeddings, _ = model_outputs(model, load_files(files, image_size))
    projection = Projection.fit(embeddings, dim)
    profile = profile_files(files, labels, model, class_names, image_size, projection)
    return ReferenceProfile(profile, projection, list(class_names), image_size, test_accuracy, test_images)
