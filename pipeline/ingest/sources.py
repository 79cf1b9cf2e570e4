"""Image sources: each yields (label, file name, bytes) without touching the original data."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import EmbeddedSource, TfdsSource
from pipeline.errors import IngestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    """One file to ingest: it lands at <raw>/<label>/<name>."""

    label: str
    name: str
    data: bytes


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array (H, W) or (H, W, C); deterministic, as Pillow writes no timestamp."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def embedded_digits(cfg: EmbeddedSource) -> tuple[int, Iterator[SourceFile]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as 8-bit PNGs.

    Returns:
        The number of files and an iterator over them.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The bundled pixels are 0..16; stretch them to the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if cfg.scale > 1:
        images = images.repeat(cfg.scale, axis=1).repeat(cfg.scale, axis=2)

    def files() -> Iterator[SourceFile]:
        for index, (pixels, target) in enumerate(zip(images, digits.target, strict=True)):
            yield SourceFile(str(target), f"digit_{index:04d}.png", encode_png(pixels))

    return len(images), files()


def _class_dirs(folder: Path) -> list[Path]:
    entries = sorted(folder.iterdir())
    for entry in entries:
        if entry.is_file() and not entry.name.startswith("."):
            log.warning("%s: not inside a class folder; skipped (move it into <class>/)", entry)
    return [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]


def class_folder_tree(folder: Path) -> tuple[int, Iterator[SourceFile]]:
    """Every file of a class-per-folder tree, images or not, read but never changed.

    Non-image files are yielded too so that ingest lists them; hidden files
    (such as .DS_Store) are skipped.

    Raises:
        IngestError: when the folder holds no class folders.
    """
    class_dirs = _class_dirs(folder)
    if not class_dirs:
        raise IngestError(f"{folder}: no class folders found; expected <folder>/<class>/<image>")
    found = [
        (class_dir.name, path)
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(class_dir).parts)
    ]

    def files() -> Iterator[SourceFile]:
        for label, path in found:
            yield SourceFile(label, path.relative_to(folder / label).as_posix(), path.read_bytes())

    return len(found), files()


def accepted_batches(folder: Path) -> tuple[int, Iterator[SourceFile]]:
    """Batches the drift-check flow accepted for training: <folder>/<batch>/<class>/<file>.

    Each lands as <class>/<batch>__<file>, so its names never clash with the
    source's. Every batch is versioned by its own `<batch>.dvc` file.

    Raises:
        IngestError: when a batch's .dvc file is there but its images are not
            (a clone that has not run `dvc pull`).
    """
    if not folder.is_dir():
        return 0, iter(())
    for dvc_file in sorted(folder.glob("*.dvc")):
        if not (folder / dvc_file.stem).is_dir():
            raise IngestError(
                f"{dvc_file}: batch '{dvc_file.stem}' is versioned but its images are missing; "
                f"run `dvc pull {dvc_file}` (or `dvc checkout {dvc_file}`) first"
            )
    batches = [b for b in sorted(folder.iterdir()) if b.is_dir() and not b.name.startswith(".")]
    trees = [class_folder_tree(batch) for batch in batches]

    def files() -> Iterator[SourceFile]:
        for batch, (_, tree) in zip(batches, trees, strict=True):
            for item in tree:
                yield SourceFile(item.label, f"{batch.name}__{item.name}", item.data)

    return sum(count for count, _ in trees), files()


def tfds_dataset(cfg: TfdsSource, data_dir: Path) -> tuple[int, Iterator[SourceFile]]:
    """A TensorFlow Datasets image-classification split, written out as PNGs.

    Uses the real `tfds.load`; with `download: false` the dataset must already
    be prepared under `data_dir` (for example by `tfds build`).

    Raises:
        IngestError: when the dataset is unknown, not prepared, or has no image/label features.
    """
    import tensorflow_datasets as tfds

    try:
        dataset, info = tfds.load(
            cfg.name,
            split=cfg.split,
            data_dir=str(data_dir),
            download=cfg.download,
            as_supervised=True,
            with_info=True,
        )
    except Exception as error:  # tfds raises several unrelated types for "not available"
        raise IngestError(
            f"ingest.tfds.name: cannot load TFDS dataset '{cfg.name}' split '{cfg.split}' from "
            f"{data_dir}: {error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            "Prepare it there (`tfds build`) or set ingest.tfds.download: true"
        ) from None
    label_feature = info.features[info.supervised_keys[1]]
    if not hasattr(label_feature, "names"):
        raise IngestError(f"ingest.tfds.name: '{cfg.name}' has no class-label feature to use as label")
    names = label_feature.names
    total = info.splits[cfg.split].num_examples

    def files() -> Iterator[SourceFile]:
        for index, (pixels, label) in enumerate(tfds.as_numpy(dataset)):
            yield SourceFile(names[int(label)], f"{cfg.name}_{index:06d}.png", encode_png(pixels))

    return total, files()
