"""The landing area for new image batches: find ready batches, accept them for training, move them aside.

A batch is a folder under the landing area: `<batch>/<class>/<image>` when
it is labelled, `<batch>/<image>` when it is not. Batches are moved, never
deleted: to `<archive>/processed/` once checked, to
`<archive>/awaiting_labels/` when they drifted but carry no labels.

With an S3 landing area (`drift.landing_s3`), settled batches uploaded to
`s3://<bucket>/<prefix>/<batch>/...` are first pulled into the local one
(verified downloads, renamed into place whole), and their objects are moved
to `<prefix>/_received/<batch>/` in the bucket.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import chdir
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline import s3
from pipeline.config import StorageConfig
from pipeline.errors import IngestError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
PROCESSED = "processed"
AWAITING_LABELS = "awaiting_labels"


@dataclass(frozen=True)
class Batch:
    """One batch in the landing area: its image files and, when labelled, their labels."""

    name: str
    path: Path
    files: list[Path]
    labels: list[str] | None
    ignored: list[Path]

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith((".", "_")) for part in path.relative_to(top).parts)


def read_batch(path: Path) -> Batch:
    """List a batch folder.

    Raises:
        IngestError: when the batch mixes loose images with class folders, or has no images.
    """
    entries = sorted(p for p in path.rglob("*") if p.is_file() and _visible(p, path))
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
    loose = [p for p in images if p.parent == path]
    if not images:
        raise IngestError(f"{path}: batch has no images (.png, .jpg, .bmp, .gif, .webp)")
    if loose and len(loose) != len(images):
        raise IngestError(
            f"{path}: batch mixes {len(loose)} loose images with class folders; put every image "
            "in <batch>/<class>/ (labelled) or all directly in <batch>/ (unlabelled)"
        )
    labels = None if loose else [p.relative_to(path).parts[0] for p in images]
    return Batch(path.name, path, images, labels, ignored)


def is_settled(path: Path, settle_seconds: float, now: float | None = None) -> bool:
    """True when no file in the batch changed for `settle_seconds` (the upload is finished)."""
    newest = max((p.stat().st_mtime for p in path.rglob("*")), default=path.stat().st_mtime)
    return (now if now is not None else time.time()) - newest >= settle_seconds


def ready_batches(landing: Path, settle_seconds: float) -> list[Path]:
    """Batch folders in the landing area whose upload has settled, oldest name first."""
    if not landing.is_dir():
        return []
    return [
        p
        for p in sorted(landing.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_")) and is_settled(p, settle_seconds)
    ]


def move_aside(batch: Path, archive: Path, outcome: str) -> Path:
    """Move a batch folder to `<archive>/<outcome>/`; a name already there gets a timestamp suffix."""
    target = archive / outcome / batch.name
    if target.exists():
        target = target.with_name(f"{batch.name}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(batch), str(target))
    log.info("batch %s moved to %s", batch.name, target)
    return target


def accept(batch: Batch, batches: Path, root: Path) -> Path:
    """Copy a labelled batch into the training data and version it with `dvc add`.

    The copy replaces what an earlier, interrupted attempt on the same batch
    left behind. The landing folder itself is left for the caller to move.

    Returns:
        The `.dvc` file that now versions the batch (commit it to git).
    """
    from dvc.repo import Repo

    if not batch.labelled:
        raise IngestError(f"{batch.path}: an unlabelled batch cannot be added to the training data")
    target = batches / batch.name
    shutil.rmtree(target, ignore_errors=True)
    for source, label in zip(batch.files, batch.labels or [], strict=True):
        destination = target / label / source.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    with chdir(root), Repo(str(root)) as repo:
        repo.add([str(target.relative_to(root))])
    log.info("batch %s versioned with DVC at %s", batch.name, target)
    return target.with_name(f"{batch.name}.dvc")


RECEIVED = "_received"


def _s3_batches(location: s3.S3Location, objects: list[s3.S3Object]) -> dict[str, list[s3.S3Object]]:
    """Objects grouped by batch (first path part under the prefix); skips `_`/`.` names, folder markers."""
    batches: dict[str, list[s3.S3Object]] = {}
    for obj in objects:
        parts = obj.key[len(location.prefix) :].split("/")
        if len(parts) < 2 or obj.key.endswith("/") or parts[0].startswith((".", "_")):
            continue
        if any(part in {"", ".", ".."} for part in parts):
            log.warning("s3://%s/%s: unusable object name; left in S3", location.bucket, obj.key)
            continue
        batches.setdefault(parts[0], []).append(obj)
    return batches


def _received_prefix(client: object, location: s3.S3Location, batch: str) -> str:
    """`<prefix>_received/<batch>/`, with a timestamp suffix when a batch of that name came before."""
    prefix = location.key(f"{RECEIVED}/{batch}/")
    if next(s3.list_objects(client, s3.S3Location(location.bucket, prefix)), None) is not None:
        prefix = location.key(f"{RECEIVED}/{batch}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}/")
    return prefix


def pull_s3_batches(
    location: s3.S3Location, landing: Path, settle_seconds: float, storage: StorageConfig
) -> list[str]:
    """Download the settled batches of an S3 landing area into the local landing area.

    A batch is settled when none of its objects changed for `settle_seconds`.
    It is downloaded into a hidden folder, each file checked against its
    size and ETag and given the object's modification time, then renamed to
    `<landing>/<batch>`; only then are its objects moved to
    `<prefix>_received/<batch>/` in the bucket (copied, then deleted). A batch
    whose name is already in the local landing area is left in S3 until that
    one has been checked.

    Returns:
        The names of the batches pulled.
    """
    client = s3.client(storage)
    now = time.time()
    pulled = []
    for name, objects in sorted(_s3_batches(location, list(s3.list_objects(client, location))).items()):
        if now - max(obj.modified for obj in objects) < settle_seconds:
            log.info("s3 batch %s%s/ is still changing; left for the next check", location, name)
            continue
        if (landing / name).exists():
            log.warning(
                "batch %s is already in %s; s3 batch %s%s/ is left until it is checked",
                name,
                landing,
                location,
                name,
            )
            continue
        staging = landing / f".pull-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        batch_prefix = location.key(f"{name}/")
        for obj in objects:
            target = staging / obj.key[len(batch_prefix) :]
            s3.download(client, location.bucket, obj, target, storage.max_attempts)
            os.utime(target, (obj.modified, obj.modified))
        staging.rename(landing / name)
        received = _received_prefix(client, location, name)
        moved = s3.move_objects(client, location.bucket, objects, batch_prefix, received)
        log.info(
            "s3 batch %s%s/: %d files -> %s; objects moved to s3://%s/%s",
            location,
            name,
            moved,
            landing / name,
            location.bucket,
            received,
        )
        pulled.append(name)
    return pulled
