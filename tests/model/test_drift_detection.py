"""Drift detection on the embedded digits: quiet on unshifted batches, firing on real shifts.

A small CNN is trained on the train split; its reference profile is computed
on the validation split; batches are drawn from the test split, which neither
the weights nor the reference saw. Each check is the flow's own check
(`pipeline.monitoring.check.check_batch`: every detector, the family-wise verdict).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DriftConfig, EmbeddedSource
from pipeline.images import load_files
from pipeline.ingest.sources import embedded_digits
from pipeline.monitoring.check import Champion, check_batch
from pipeline.monitoring.landing import read_batch
from pipeline.monitoring.profile import build_reference
from pipeline.monitoring.shifts import (
    Shift,
    brightness,
    class_prior_sample,
    gaussian_noise,
    rotation,
    unchanged,
    write_batch,
)

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
BATCH = 100
CFG = DriftConfig()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, np.ndarray]:
    """The embedded default written out as PNGs, split 70/20/10 stratified."""
    from sklearn.model_selection import train_test_split

    root = tmp_path_factory.mktemp("digits")
    files, labels = [], []
    for item in embedded_digits(EmbeddedSource())[1]:
        path = root / item.label / item.name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(item.data)
        files.append(path)
        labels.append(item.label)
    files, labels = np.array(files), np.array(labels)
    index = np.arange(len(files))
    train, rest = train_test_split(index, train_size=0.7, stratify=labels, random_state=42)
    val, test = train_test_split(rest, train_size=2 / 3, stratify=labels[rest], random_state=42)
    return {"files": files, "labels": labels, "train": train, "val": val, "test": test}


def champion_without(digits: dict, withheld: set[str]) -> Champion:
    """Train a small CNN on the train split minus `withheld` classes; reference on val (same classes)."""
    import keras

    from pipeline.train.models import small_cnn

    def keep(index: np.ndarray) -> np.ndarray:
        return index[~np.isin(digits["labels"][index], list(withheld))]

    train, val, test = keep(digits["train"]), keep(digits["val"]), keep(digits["test"])
    classes = sorted(set(digits["labels"][train]))
    keras.utils.set_random_seed(0)
    model = small_cnn(IMAGE_SIZE, len(classes), 0.3)
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    targets = np.array([classes.index(label) for label in digits["labels"][train]])
    model.fit(load_files(digits["files"][train], IMAGE_SIZE), targets, epochs=15, batch_size=32, verbose=0)
    test_predictions = model.predict(load_files(digits["files"][test], IMAGE_SIZE), verbose=0).argmax(axis=1)
    test_accuracy = float(np.mean(np.array(classes)[test_predictions] == digits["labels"][test]))
    assert test_accuracy > 0.95, "the champion the detectors use should be a real one"
    reference = build_reference(
        list(digits["files"][val]),
        list(digits["labels"][val]),
        model,
        classes,
        IMAGE_SIZE,
        CFG.embeddings.dim,
        test_accuracy,
    )
    return Champion("digits", "1", "-", datetime.now(UTC), model, reference)


@pytest.fixture(scope="module")
def champion(digits) -> Champion:
    return champion_without(digits, set())


def detected(
    champion: Champion, digits: dict, index: np.ndarray, shift: Shift, target: Path, seed: int
) -> bool:
    """Write a labelled batch of the given images with the shift applied; the flow-level verdict."""
    batch = write_batch(list(digits["files"][index]), list(digits["labels"][index]), target, shift, seed)
    report, _ = check_batch(read_batch(batch), champion, CFG, max_pixels=10**8)
    return report.drift


def alarm_rate(
    champion: Champion, digits: dict, draw: Callable[[], np.ndarray], shift: Shift, folder: Path, repeats: int
) -> float:
    """The share of `repeats` batches (indices from `draw`, shifted) in which the check found drift."""
    alarms = [detected(champion, digits, draw(), shift, folder / str(i), i) for i in range(repeats)]
    print(f"{folder.name}: alarm rate {np.mean(alarms):.2f} over {repeats} batches")
    return float(np.mean(alarms))


def test_quiet_on_unshifted_batches(champion, digits, tmp_path: Path):
    rng = np.random.default_rng(7)
    rate = alarm_rate(
        champion, digits, lambda: rng.choice(digits["test"], BATCH, replace=False), unchanged(), tmp_path, 50
    )
    assert rate <= 0.15, f"false-alarm rate {rate:.2f} over 50 unshifted batches"


@pytest.mark.parametrize(
    "name, shift",
    [
        ("brightness+0.3", brightness(0.3)),
        ("noise-sigma-0.1", gaussian_noise(0.1)),
        ("rotation-40", rotation(40)),
    ],
)
def test_fires_on_covariate_shift(champion, digits, tmp_path: Path, name: str, shift: Shift):
    rng = np.random.default_rng(11)
    rate = alarm_rate(
        champion, digits, lambda: rng.choice(digits["test"], BATCH, replace=False), shift, tmp_path / name, 10
    )
    assert rate >= 0.8, f"{name}: detection rate {rate:.1f}"


def test_fires_on_a_75_25_class_prior_shift(champion, digits, tmp_path: Path):
    rng = np.random.default_rng(13)
    test_labels = digits["labels"][digits["test"]]
    favoured = ["0", "1", "2", "3", "4"]  # half the classes get 75% of the batch instead of 50%

    def draw() -> np.ndarray:
        return digits["test"][class_prior_sample(test_labels, BATCH, favoured, 0.75, rng)]

    rate = alarm_rate(champion, digits, draw, unchanged(), tmp_path / "prior", 10)
    assert rate >= 0.8, f"class-prior shift: detection rate {rate:.1f}"


def test_fires_when_half_the_batch_is_a_class_withheld_from_training(digits, tmp_path: Path):
    partial = champion_without(digits, {"9"})
    unseen = np.flatnonzero(digits["labels"] == "9")  # never in training or in the reference
    known = digits["test"][digits["labels"][digits["test"]] != "9"]
    rng = np.random.default_rng(17)

    def draw() -> np.ndarray:
        half = BATCH // 2
        picks = [rng.choice(unseen, half, replace=False), rng.choice(known, half, replace=False)]
        return np.concatenate(picks)

    rate = alarm_rate(partial, digits, draw, unchanged(), tmp_path / "novel", 10)
    assert rate >= 0.8, f"withheld class: detection rate {rate:.1f}"
