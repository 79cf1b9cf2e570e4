"""Per-detector false-alarm rate and power of the drift check, on synthetic shapes the champion never saw.

A small CNN (the champion) learns three of the `shapes` of tests/datasets.py
(circle, square, triangle: random colours, placement and size), on its own
training images; its reference profile is built on a second set and its test
accuracy measured on a third. The images batches are cut from come from the
same generator with other seeds, so neither the weights nor the reference saw
them. Each pool (clean images, each shift of them, a class the champion never
saw) is written as PNGs and profiled once, as a check profiles a batch
(`profile_files`); a batch is then a slice of the profiled arrays, so
hundreds of checks cost only the detectors. The batches of one experiment
never share an image.

Shared by tests/model/test_detector_power.py and bench/drift_power.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import DriftConfig
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.monitoring.check import DETECTORS, detect
from pipeline.monitoring.landing import read_batch
from pipeline.monitoring.profile import BatchProfile, ReferenceProfile, build_reference, profile_files
from pipeline.monitoring.shifts import Shift, brightness, gaussian_noise, rotation, write_batch
from tests.datasets import TASKS, colours

CLASSES = ("circle", "square", "triangle")  # what the champion learns
UNSEEN = "cross"  # never in training, the reference or the clean pools
IMAGE_SIZE = 32  # the model's input; images are drawn at 32-48 px and resized, as a check does
TRAIN_IMAGES, REFERENCE_IMAGES, TEST_IMAGES = 900, 600, 300

BRIGHTNESS, NOISE_SIGMA, ROTATION_DEGREES = 0.2, 0.1, 30
PRIOR_SHARE = 0.7  # class-prior shift: CLASSES[0] is 70% of the batch instead of a third
UNSEEN_SHARE = 0.5  # half the batch is the UNSEEN class
LABEL_NOISE = 0.2  # a fifth of the labels name another class: accuracy drops by about that much
IMPERFECT = 0.1  # imperfect_champion: a champion wrong on a tenth of the images, in test and batches alike
# Covariate shifts, applied image by image to a pool of clean images (pipeline.monitoring.shifts).
PIXEL_SHIFTS: dict[str, Shift] = {
    "brightness": brightness(BRIGHTNESS),
    "noise": gaussian_noise(NOISE_SIGMA),
    "rotation": rotation(ROTATION_DEGREES),
}
SHIFTS = {
    "clean": "no shift",
    "brightness": f"+{BRIGHTNESS} on every pixel (0-1 scale)",
    "noise": f"Gaussian noise, sigma {NOISE_SIGMA} (0-1 scale)",
    "rotation": f"rotated {ROTATION_DEGREES} degrees, corners black",
    "prior": f"{CLASSES[0]}s are {PRIOR_SHARE:.0%} of the batch instead of a third",
    "unseen": f"{UNSEEN_SHARE:.0%} of the batch is {UNSEEN}es, a class the champion never saw",
    "label_noise": f"{LABEL_NOISE:.0%} of the labels name another class",
}

# The shift each detector is there to catch, on which its power is measured. The softmax
# detector's is rotation rather than the unseen class: it catches half a batch of crosses less
# reliably (about 0.5 at 25 images, 0.9 at 50; see bench/README.md), the embeddings catch those.
TARGETS = {
    "image_stats": "brightness",
    "embeddings": "noise",
    "softmax": "rotation",
    "predicted_labels": "prior",
    "true_labels": "prior",
    "accuracy": "label_noise",
}
LABELLED_ONLY = {name for name, (needs_labels, _) in DETECTORS.items() if needs_labels}


@dataclass(frozen=True)
class Pools:
    """The champion's reference and the profiled images batches are cut from (labels always kept)."""

    reference: ReferenceProfile
    clean: BatchProfile  # clean images: false-alarm batches, and what prior, unseen, label_noise draw on
    shifted: dict[str, BatchProfile]  # PIXEL_SHIFTS of another set of clean images; unseen: UNSEEN images


@dataclass(frozen=True)
class AlarmRate:
    """How often one detector (or `any`) alarmed over a series of checks, and at what level."""

    alarms: int
    checks: int
    alpha: float  # the detector's share of the level in these checks; cfg.alpha for `any`

    @property
    def rate(self) -> float:
        return self.alarms / self.checks

    @property
    def bound(self) -> float:
        return false_alarm_bound(self.alpha, self.checks)


def false_alarm_bound(alpha: float, checks: int) -> float:
    """The highest false-alarm rate a level-`alpha` test passes on `checks` clean batches.

    A detector that holds its level alarms on a clean batch with probability
    at most alpha; the batches share no image, so (given the reference) their
    alarms are independent and the count is at most Binomial(checks, alpha).
    The bound is alpha plus three binomial standard errors. With 200 checks at
    the shares a check gives (1/60 for six detectors, 1/40 for four, 1/10 for
    the family), the exact binomial chance of a valid detector exceeding it is
    0.7%, 0.5% and 0.3%: a rate above it is the detector, not bad luck.
    """
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / checks)


def write_shapes(folder: Path, count: int, classes: tuple[str, ...], seed: int) -> Path:
    """`count` shapes, classes in turn, as RGB PNGs of 32-48 px: `<folder>/<class>/<n>.png`.

    Returns:
        `folder`, a labelled batch folder.
    """
    rng = np.random.default_rng(seed)
    painters = TASKS["shapes"].classes
    for index in range(count):
        label = classes[index % len(classes)]
        side = int(rng.integers(32, 49))
        fg, bg = colours(rng)
        image = Image.new("RGB", (side, side), bg)
        painters[label](ImageDraw.Draw(image), rng, side, fg, bg)
        (folder / label).mkdir(parents=True, exist_ok=True)
        image.save(folder / label / f"{index:06d}.png")
    return folder


def train_champion(folder: Path, epochs: int = 12, seed: int = 0):
    """A small CNN trained on a labelled folder of CLASSES (class indices in that order)."""
    import keras

    from pipeline.train.models import small_cnn

    batch = read_batch(folder)
    keras.utils.set_random_seed(seed)
    model = small_cnn(IMAGE_SIZE, len(CLASSES), 0.2, width=16)  # width 16: profiling 20k images stays cheap
    # At 1e-3 it leaves chance by the fifth epoch and sits at 0.98-1.0 from the ninth; at 2e-3 the first
    # epochs plateau longer and a 10-epoch run ended anywhere from 0.4 to 1.0 (seeds 0-2).
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    targets = np.array([CLASSES.index(label) for label in batch.labels or []])
    model.fit(load_files(batch.files, IMAGE_SIZE), targets, epochs=epochs, batch_size=32, verbose=0)
    return model


def champion_reference(workdir: Path, dim: int, seed: int) -> tuple[object, ReferenceProfile]:
    """Train the champion; its reference profile on other images, with its accuracy on a third set."""
    model = train_champion(write_shapes(workdir / "train", TRAIN_IMAGES, CLASSES, seed), seed=seed)
    test = read_batch(write_shapes(workdir / "test", TEST_IMAGES, CLASSES, seed + 1))
    predicted = np.array(CLASSES)[predict(model, load_files(test.files, IMAGE_SIZE)).argmax(axis=1)]
    accuracy = float(np.mean(predicted == np.array(test.labels)))
    held_out = read_batch(write_shapes(workdir / "reference", REFERENCE_IMAGES, CLASSES, seed + 2))
    reference = build_reference(
        held_out.files, held_out.labels or [], model, CLASSES, IMAGE_SIZE, dim, accuracy, len(test.files)
    )
    return model, reference


def profile_folder(folder: Path, model, reference: ReferenceProfile) -> BatchProfile:
    """Profile a labelled batch folder with the champion, as a check does."""
    batch = read_batch(folder)
    return profile_files(
        batch.files, batch.labels, model, reference.class_names, reference.image_size, reference.projection
    )


def build_pools(
    workdir: Path,
    clean: int,
    shift_batches: tuple[int, int],
    dim: int,
    shifts: Collection[str] = tuple(SHIFTS),
    seed: int = 0,
) -> Pools:
    """Train the champion, build its reference, and write and profile every pool under `workdir`.

    Args:
        workdir: an empty scratch folder.
        clean: images in the clean pool; more when the shifted batches drawn from it need more.
        shift_batches: (size, count) of the largest series of shifted batches to be drawn.
        dim: PCA components of the reference's embedding projection (`drift.embeddings.dim`).
        shifts: the SHIFTS batches will be drawn under (those with pools of their own cost images).
        seed: base seed; each set of images gets its own seed derived from it.
    """
    size, count = shift_batches
    favoured = round(PRIOR_SHARE * size) * count  # images of CLASSES[0], a third of the clean pool
    clean = max(clean, len(CLASSES) * favoured, size * count)
    model, reference = champion_reference(workdir, dim, seed)
    source = read_batch(write_shapes(workdir / "source", size * count, CLASSES, seed + 4))
    folders = {}
    for offset, (name, shift) in enumerate(PIXEL_SHIFTS.items()):
        if name in shifts:
            folders[name] = write_batch(
                source.files, source.labels, workdir / name, shift, seed + 10 + offset
            )
    if "unseen" in shifts:
        unseen = round(UNSEEN_SHARE * size) * count
        folders["unseen"] = write_shapes(workdir / "unseen", unseen, (UNSEEN,), seed + 5)
    return Pools(
        reference=reference,
        clean=profile_folder(write_shapes(workdir / "clean", clean, CLASSES, seed + 3), model, reference),
        shifted={name: profile_folder(folder, model, reference) for name, folder in folders.items()},
    )


def take(pool: BatchProfile, index: np.ndarray, labelled: bool = True) -> BatchProfile:
    """The batch of the pool's images at `index`; without its labels when not `labelled`."""
    return BatchProfile(
        statistics=pool.statistics[index],
        embeddings=pool.embeddings[index],
        probabilities=pool.probabilities[index],
        predicted=[pool.predicted[i] for i in index],
        labels=[pool.labels[i] for i in index] if labelled and pool.labels is not None else None,
    )


def join(first: BatchProfile, second: BatchProfile) -> BatchProfile:
    """One pool of both pools' images, first then second (labels kept)."""
    return BatchProfile(
        statistics=np.vstack([first.statistics, second.statistics]),
        embeddings=np.vstack([first.embeddings, second.embeddings]),
        probabilities=np.vstack([first.probabilities, second.probabilities]),
        predicted=[*first.predicted, *second.predicted],
        labels=[*(first.labels or []), *(second.labels or [])],
    )


def relabel(pool: BatchProfile, share: float, rng: np.random.Generator) -> BatchProfile:
    """The pool with `share` of its labels, chosen at random, replaced by another of CLASSES."""
    labels = list(pool.labels or [])
    for i in rng.choice(len(labels), int(round(share * len(labels))), replace=False):
        labels[i] = str(rng.choice([c for c in CLASSES if c != labels[i]]))
    return replace(pool, labels=labels)


def imperfect_champion(pools: Pools, wrong: float, seed: int) -> tuple[ReferenceProfile, BatchProfile]:
    """A clean null for a champion wrong on `wrong` of the images: its reference and its clean pool.

    The champion here is right on nearly every clean image, so its accuracy
    detector has next to nothing to get wrong on a clean batch (at 25 images it
    needs two misses to alarm) and its false-alarm rate says little. Replacing
    `wrong` of the labels by another class, in the reference images (whose
    accuracy then stands in for the test accuracy, over as many images) and in
    the clean pool alike, makes a batch's hits and the test split's draws of
    the same rate, as for an honest champion at 1 - `wrong`.
    """
    rng = np.random.default_rng(seed)
    held_out = relabel(pools.reference.profile, wrong, rng)
    accuracy = float(np.mean(np.array(held_out.predicted) == np.array(held_out.labels)))
    reference = replace(
        pools.reference, profile=held_out, test_accuracy=accuracy, test_images=len(held_out.predicted)
    )
    return reference, relabel(pools.clean, wrong, rng)


def disjoint(pool_size: int, size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` random batches of `size` indices into a pool, no index in two batches.

    Raises:
        ValueError: when the pool is too small for that.
    """
    if size * count > pool_size:
        raise ValueError(
            f"{count} disjoint batches of {size} need {size * count} images; the pool has {pool_size}"
        )
    return list(rng.permutation(pool_size)[: size * count].reshape(count, size))


def mixed(
    pool: BatchProfile,
    inside: np.ndarray,
    outside: np.ndarray,
    share: float,
    size: int,
    count: int,
    labelled: bool,
    rng: np.random.Generator,
) -> list[BatchProfile]:
    """`count` batches of `size`, `share` of each from `inside` (indices), the rest from `outside`.

    No index is in two batches.
    """
    first = int(round(share * size))
    picks = [inside[i] for i in disjoint(len(inside), first, count, rng)]
    fill = [outside[i] for i in disjoint(len(outside), size - first, count, rng)]
    return [take(pool, np.concatenate(pair), labelled) for pair in zip(picks, fill, strict=True)]


def batches(pools: Pools, shift: str, size: int, count: int, labelled: bool, seed: int) -> list[BatchProfile]:
    """`count` batches of `size` images under one of SHIFTS, no image in two of them.

    clean: from the clean pool. brightness, noise, rotation: from that shift's
    pool. prior: the first of CLASSES makes PRIOR_SHARE of each batch (clean
    images). unseen: UNSEEN_SHARE of each batch is the UNSEEN class, the rest
    clean images. label_noise: clean images, LABEL_NOISE of their labels wrong.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; one of {', '.join(SHIFTS)}")
    if shift in (*PIXEL_SHIFTS, "unseen") and shift not in pools.shifted:
        raise ValueError(f"no pool for {shift}: build_pools was not asked for it")
    rng = np.random.default_rng(seed)
    if shift == "prior":
        favoured = np.array(pools.clean.labels) == CLASSES[0]
        inside, outside = np.flatnonzero(favoured), np.flatnonzero(~favoured)
        return mixed(pools.clean, inside, outside, PRIOR_SHARE, size, count, labelled, rng)
    if shift == "unseen":
        pool = join(pools.shifted["unseen"], pools.clean)
        inside = np.arange(len(pools.shifted["unseen"].predicted))
        outside = len(inside) + np.arange(len(pools.clean.predicted))
        return mixed(pool, inside, outside, UNSEEN_SHARE, size, count, labelled, rng)
    if shift == "label_noise":
        pool = relabel(pools.clean, LABEL_NOISE, rng)
    else:
        pool = pools.clean if shift == "clean" else pools.shifted[shift]
    return [take(pool, index, labelled) for index in disjoint(len(pool.predicted), size, count, rng)]


def alarm_rates(
    reference: ReferenceProfile, checks: list[BatchProfile], cfg: DriftConfig
) -> dict[str, AlarmRate]:
    """Each detector's alarms over the checks (`detect`, as a check runs it), and those of `any` detector."""
    outcomes = [detect(reference, batch, cfg) for batch in checks]
    rates = {
        result.name: AlarmRate(sum(o[i].drift for o in outcomes), len(outcomes), result.threshold)
        for i, result in enumerate(outcomes[0])
    }
    rates["any"] = AlarmRate(sum(any(r.drift for r in o) for o in outcomes), len(outcomes), cfg.alpha)
    return rates
