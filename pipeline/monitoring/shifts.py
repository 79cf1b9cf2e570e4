"""Synthetic shifts of image batches, for the drift demo, the drift tests and the drift benchmark.

Each shift works on 8-bit images on a 0-1 scale and writes a batch folder the
drift-check flow reads: `<batch>/<class>/<file>` (labelled) or `<batch>/<file>`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def brightness(delta: float) -> Shift:
    """Add `delta` to every pixel (0-1 scale), clipped."""
    return lambda pixels, rng: np.clip(pixels + delta, 0.0, 1.0)


def gaussian_noise(sigma: float) -> Shift:
    """Add independent Gaussian noise of standard deviation `sigma` (0-1 scale), clipped."""
    return lambda pixels, rng: np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0.0, 1.0)


def rotation(degrees: float) -> Shift:
    """Rotate by `degrees` about the centre, keeping the size (corners filled with black)."""

    def rotate(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
        return np.asarray(image.rotate(degrees, resample=Image.Resampling.BILINEAR), dtype=np.float64) / 255

    return rotate


def unchanged() -> Shift:
    """No shift (the control)."""
    return lambda pixels, rng: pixels


def read_pixels(path: Path) -> np.ndarray:
    """An image file as float pixels on a 0-1 scale (grayscale stays 2-D)."""
    with Image.open(path) as opened:
        image = opened if opened.mode in {"L", "RGB"} else opened.convert("RGB")
        return np.asarray(image, dtype=np.float64) / 255.0


def shifted_png(path: Path, shift: Shift, rng: np.random.Generator) -> bytes:
    """The image at `path`, shifted, as PNG bytes (what a client would send the service)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.round(shift(read_pixels(path), rng) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_batch(
    files: Sequence[Path],
    labels: Sequence[str] | None,
    target: Path,
    shift: Shift,
    seed: int,
) -> Path:
    """Write shifted copies of `files` as a batch folder (labelled when `labels` is given).

    Returns:
        The batch folder.
    """
    rng = np.random.default_rng(seed)
    for index, source in enumerate(files):
        pixels = shift(read_pixels(source), rng)
        folder = target / labels[index] if labels is not None else target
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(
            folder / f"{index:05d}_{source.stem}.png"
        )
    return target


def class_prior_sample(
    labels: Sequence[str], size: int, favoured: Sequence[str], share: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of a sample in which `share` of the images come from the `favoured` classes.

    Args:
        labels: the label of every candidate image.
        size: images to draw (without replacement).
        favoured: the classes that get `share` of the sample (0.75 for a 75/25 shift).
        share: fraction drawn from the favoured classes.
        rng: the random generator.
    """
    is_favoured = np.isin(np.asarray(labels), favoured)
    inside, outside = np.flatnonzero(is_favoured), np.flatnonzero(~is_favoured)
    count = int(round(size * share))
    return np.concatenate(
        [rng.choice(inside, count, replace=False), rng.choice(outside, size - count, replace=False)]
    )
