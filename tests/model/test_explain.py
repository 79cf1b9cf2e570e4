"""The explain stage: saliency that finds a known answer, and the report it writes.

The key test trains the small CNN on a task whose answer is known: the class
is the orientation of bright stripes in one fixed 10x10 square (horizontal or
vertical), and everything else is dim noise drawn the same way for both
classes. Each method must then put its attribution in that square.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import explain, tracking
from pipeline.artifacts import image_files, load_trained_model, read_split
from pipeline.config import ExplainConfig
from pipeline.explain.methods import GradCamUnavailable, feature_map
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.train.models import small_cnn
from tests.model.conftest import Project, build_config, local_tracking

pytestmark = pytest.mark.slow

SIZE = 32
REGION = (slice(4, 14), slice(18, 28))  # 100 of 1024 pixels, off-centre, not on the 4-px grid of the CAM
BACKGROUND = (0.0, 128.0)  # dim noise: the stripes' 0/255 rows are the same in both classes


def stripes_task(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 32, 32, 3) pixels and labels: 0 horizontal stripes in REGION, 1 vertical ones."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(*BACKGROUND, (count, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    stripes = np.zeros((10, 10), dtype=np.float32)
    stripes[::2] = 255.0
    for image, label in zip(images, labels, strict=True):
        image[REGION] = (stripes if label == 0 else stripes.T)[..., None]
    return images, labels


@dataclass(frozen=True)
class Known:
    """A model trained on the stripes task, held-out images and what it predicts for them."""

    model: keras.Model
    images: np.ndarray
    predicted: np.ndarray
    region: np.ndarray  # (32, 32) bool


@pytest.fixture(scope="module")
def known() -> Known:
    keras.utils.set_random_seed(0)
    train_images, train_labels = stripes_task(200, seed=1)
    held_images, held_labels = stripes_task(100, seed=2)
    model = small_cnn(SIZE, 2, 0.0, width=8)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(train_images, train_labels, epochs=8, batch_size=16, verbose=0)
    predicted = predict(model, held_images).argmax(axis=1)
    accuracy = float((predicted == held_labels).mean())
    assert accuracy > 0.9, f"the stripes task was not learned: held-out accuracy {accuracy:.2f}"
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[REGION] = True
    return Known(model, held_images[:16], predicted[:16], region)


def shares(maps: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per map, the share of its (non-negative) mass that lies inside `region`."""
    return np.array([m[region].sum() / m.sum() for m in maps])


def test_integrated_gradients_mass_is_in_the_deciding_region(known: Known) -> None:
    maps = explain.integrated_gradients(known.model, known.images, known.predicted, steps=32)
    assert maps.shape == (16, SIZE, SIZE) and (maps >= 0).all()
    measured = shares(maps, known.region)
    # Control: the black baseline favours bright pixels, so compare with brightness alone.
    brightness = shares(known.images.sum(axis=-1), known.region)
    area = known.region.mean()
    assert measured.mean() > 0.5 and measured.min() > 3 * area, (
        f"IG share in the region: mean {measured.mean():.3f}, min {measured.min():.3f} "
        f"(area {area:.3f}, brightness alone {brightness.mean():.3f})"
    )
    assert measured.mean() > 2 * brightness.mean(), (
        f"IG {measured.mean():.3f}, pixels {brightness.mean():.3f}"
    )


def test_grad_cam_mass_is_in_the_deciding_region(known: Known) -> None:
    """Softer than IG: an 8x8 map upsampled from 4-px cells spreads over the square's neighbours."""
    maps = explain.grad_cam(known.model, known.images, known.predicted)
    assert maps is not None and maps.shape == (16, SIZE, SIZE)
    assert maps.min() >= 0.0 and np.allclose(maps.reshape(16, -1).max(axis=1), 1.0)
    measured, area = shares(maps, known.region), known.region.mean()
    peaks_inside = np.mean([known.region.flat[m.argmax()] for m in maps])
    assert measured.mean() > 2.5 * area and peaks_inside >= 0.9, (
        f"Grad-CAM share in the region: mean {measured.mean():.3f}, min {measured.min():.3f} "
        f"(area {area:.3f}); peak inside for {peaks_inside:.0%} of images"
    )


def test_lime_top_superpixels_overlap_the_deciding_region(known: Known) -> None:
    inside = []
    for image, class_id in zip(known.images[:4], known.predicted[:4], strict=True):
        mask = explain.lime_mask(known.model, image, int(class_id), samples=150, seed=0)
        assert mask.heatmap().shape == (SIZE, SIZE)
        assert (mask.top(1) & known.region).any(), "LIME's top superpixel misses the region"
        top = mask.top(3)
        inside.append((top & known.region).sum() / top.sum())
    assert np.mean(inside) > 0.5, f"share of LIME's top-3 superpixel pixels in the region: {inside}"


def nested_model(image_size: int) -> keras.Model:
    """A transfer-shaped model: a 1x1 preprocessing conv, then a conv base called as one layer."""
    base_input = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(base_input)
    x = keras.layers.MaxPooling2D(4)(x)
    base = keras.Model(base_input, keras.layers.Conv2D(8, 3, padding="same")(x), name="base")
    inputs = keras.Input((image_size, image_size, 3))
    x = base(keras.layers.Conv2D(3, 1, name="preprocess")(inputs), training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_grad_cam_uses_a_nested_base_and_skips_what_it_cannot_use() -> None:
    keras.utils.set_random_seed(0)
    model = nested_model(16)
    assert feature_map(model).layer == "base"  # not the preprocessing conv before it
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    maps = explain.grad_cam(model, images, np.array([0, 1, 2]))
    assert maps is not None and maps.shape == (3, 16, 16) and np.isfinite(maps).all()

    with pytest.raises(GradCamUnavailable, match="1x1"):
        feature_map(nested_model(4))
    dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    assert explain.grad_cam(dense, np.zeros((1, 8, 8, 3)), np.array([0])) is None


def test_a_method_that_cannot_run_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    monkeypatch.setitem(sys.modules, "lime.lime_image", None)  # as if lime were not installed
    settings = ExplainConfig(ig_steps=4, lime_samples=10)
    maps, status = explain.explain_images(dense, images, np.array([0, 1]), settings)
    assert set(maps) == {"integrated_gradients"} and maps["integrated_gradients"].shape == (2, 8, 8)
    assert status["grad_cam"]["status"] == "skipped" and "no Conv2D" in status["grad_cam"]["reason"]
    assert status["lime"]["status"] == "failed" and "lime.lime_image" in status["lime"]["reason"]
    no_lime = settings.model_copy(update={"lime": False})
    _, status = explain.explain_images(dense, images, np.array([0, 1]), no_lime)
    assert status["lime"]["status"] == "disabled"


def test_choose_images_takes_each_class_then_mistakes_once() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([1, 0, 0, 1, 0, 2, 2, 0])
    chosen = explain.choose_images(labels, predicted, classes=3, per_class=2, max_misclassified=1)
    assert chosen == [(0, "per_class"), (1, "per_class"), (3, "per_class"), (4, "per_class")] + [
        (5, "per_class"),
        (6, "per_class"),
        (7, "misclassified"),  # 0 and 4 are wrong too, but already chosen for their class
    ]
    assert explain.choose_images(labels, predicted, 3, 0, 10) == [
        (0, "misclassified"),
        (4, "misclassified"),
    ] + [(7, "misclassified")]


def test_stage_writes_the_page_and_logs_it(trained_project: Project) -> None:
    cfg, paths = build_config(trained_project.paths.root, {"explain": {"lime_samples": 100}})
    stale = paths.explain / "999_stale.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"not a png")
    start = time.perf_counter()
    with local_tracking():
        report = explain.run(cfg, paths)
        client = mlflow.MlflowClient(tracking.tracking_uri(paths.root))
        run_id = json.loads(paths.run_file.read_text())["run_id"]
        logged = {Path(a.path).name for a in client.list_artifacts(run_id, "explain")}
    seconds = time.perf_counter() - start

    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    labels = np.array([names.index(label) for label in test["label"]])
    predicted = predict(model, load_files(image_files(test, paths.root), SIZE)).argmax(axis=1)
    first = {i for c in range(len(names)) for i in np.flatnonzero(labels == c)[: cfg.explain.per_class]}
    wrong = [i for i in np.flatnonzero(labels != predicted) if i not in first]
    expected = len(first) + min(len(wrong), cfg.explain.max_misclassified)
    assert len(report["images"]) == expected == report["counts"]["explained"], f"{seconds:.1f} s"

    pngs = sorted(p.name for p in paths.explain.glob("*.png"))
    assert not stale.exists() and len(pngs) == expected
    page = (paths.explain / "index.html").read_text(encoding="utf-8")
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    for name in pngs:
        with Image.open(paths.explain / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > image.size[1] > 100

    written = json.loads((paths.explain / "explain.json").read_text())
    assert written == report
    assert {m: s["status"] for m, s in report["methods"].items()} == {
        "integrated_gradients": "ok",
        "grad_cam": "ok",
        "lime": "ok",
    }, report["methods"]
    for row in report["images"]:
        assert row["correct"] == (row["true"] == row["predicted"]) and 0.0 < row["confidence"] <= 1.0
        assert row["overlay"] in pngs and row["file"] in set(test["path"])
    assert logged >= {"index.html", "explain.json", *pngs}, logged
