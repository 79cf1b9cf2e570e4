"""ingest: bring the configured source into <raw>/<class>/<file>; describe each in the manifest."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from tqdm import tqdm

from pipeline.config import IngestConfig, PipelineConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.ingest.images import inspect_image
from pipeline.ingest.sources import (
    SourceFile,
    accepted_batches,
    class_folder_tree,
    embedded_digits,
    tfds_dataset,
)
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote."""

    files: int
    decodable: int
    classes: dict[str, int]
    manifest: Path


def open_source(
    cfg: IngestConfig, paths: StagePaths, storage: StorageConfig | None = None
) -> tuple[int, Iterator[SourceFile]]:
    """The configured source as (count, files); `storage` holds the S3 settings of an `s3` source.

    Raises:
        ConfigError: when a folder source lies inside the ingest output folder.
    """
    if cfg.source == "embedded":
        return embedded_digits(cfg.embedded)
    if cfg.source == "tfds":
        return tfds_dataset(cfg.tfds, paths.resolve(cfg.tfds.data_dir))
    if cfg.source == "s3":
        from pipeline.ingest.s3_source import s3_tree

        return s3_tree(cfg.s3, storage or StorageConfig(), paths.root)
    assert cfg.folder.path is not None  # guaranteed by IngestConfig
    folder = paths.resolve(cfg.folder.path)
    folder = folder.resolve()
    if folder == paths.raw or paths.raw in folder.parents:
        raise ConfigError(
            f"ingest.folder.path: {folder} is inside paths.raw ({paths.raw}), which ingest rewrites; "
            "keep your originals outside it"
        )
    return class_folder_tree(folder)


def ingest_files(
    files: Iterator[SourceFile], total: int, staging: Path, paths: StagePaths, max_pixels: int
) -> list[ManifestRow]:
    """Write each file under `staging` and describe it as it will be named under `paths.raw`."""
    rows = []
    for item in tqdm(files, total=total, desc="ingest", unit="file", mininterval=1.0):
        relative = Path(item.label) / item.name
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.data)
        rows.append(inspect_image(item.data, paths.relative(paths.raw / relative), item.label, max_pixels))
    return rows


def run(config: PipelineConfig, paths: StagePaths) -> IngestResult:
    """Ingest the configured source, plus the batches accepted into `paths.batches`.

    The new tree is assembled in a staging folder and swapped in whole, so a
    failed ingest never leaves a half-written `raw` folder. The source itself
    (your folder, the TFDS data dir) is only read.

    Args:
        config: the configuration (`ingest`, and `storage` for an `s3` source).
        paths: resolved stage paths.

    Returns:
        Counts of what was ingested.
    """
    cfg = config.ingest
    total, files = open_source(cfg, paths, config.storage)
    batch_total, batch_files = accepted_batches(paths.batches)
    if batch_total:
        log.info("adding %d files from accepted batches in %s", batch_total, paths.relative(paths.batches))
    total, files = total + batch_total, chain(files, batch_files)
    paths.raw.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=paths.raw.parent))
    try:
        rows = ingest_files(files, total, staging, paths, cfg.max_pixels)
        if paths.raw.exists():
            shutil.rmtree(paths.raw)
        staging.rename(paths.raw)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_manifest(rows, paths.manifest)
    bad = [row for row in rows if not row.decodable]
    for row in bad:
        log.warning("%s: %s", row.path, row.error)
    classes = dict(sorted(Counter(row.label for row in rows).items()))
    log.info(
        "ingested %d files in %d classes (%d not decodable) -> %s",
        len(rows),
        len(classes),
        len(bad),
        paths.relative(paths.manifest),
    )
    return IngestResult(
        files=len(rows), decodable=len(rows) - len(bad), classes=classes, manifest=paths.manifest
    )
