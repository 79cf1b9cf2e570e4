"""The `s3` ingest source: s3://<bucket>/<prefix>/<class>/<image>, mirrored incrementally into a cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline import config, s3
from pipeline.config import S3Source, StorageConfig, resolve_path
from pipeline.errors import ConfigError, IngestError
from pipeline.ingest.sources import SourceFile

log = logging.getLogger(__name__)

INDEX = ".etags.json"
DOWNLOAD_THREADS = 8


@dataclass(frozen=True)
class S3Sync:
    """What one sync of the source did."""

    location: s3.S3Location
    cache: Path
    files: list[tuple[str, str, Path]]  # (label, name under the label, cached file)
    downloaded: int
    reused: int


def source_location(source: S3Source) -> s3.S3Location:
    """The source's bucket and prefix (the config already holds PIPELINE_INGEST_S3_URI when it is set).

    Raises:
        ConfigError: when none is named.
    """
    if not source.uri:
        raise ConfigError(
            f"ingest.source is 's3' but no bucket is named: set ingest.s3.uri or {config.INGEST_URI_ENV} "
            "to s3://<bucket>/<prefix>"
        )
    return s3.parse_uri(source.uri, "ingest.s3.uri")


def _layout(location: s3.S3Location, objects: list[s3.S3Object]) -> list[tuple[str, str, s3.S3Object]]:
    """(class, name, object) of every object at <prefix>/<class>/<name>; others are skipped."""
    found = []
    for obj in objects:
        relative = obj.key[len(location.prefix) :]
        parts = relative.split("/")
        if relative.endswith("/") or any(part.startswith(".") for part in parts):
            continue  # folder markers and hidden files
        if len(parts) < 2 or any(part in {"", ".."} for part in parts):
            log.warning(
                "s3://%s/%s: not at <class>/<image> under %s; skipped", location.bucket, obj.key, location
            )
            continue
        found.append((parts[0], "/".join(parts[1:]), obj))
    return found


def sync(source: S3Source, storage: StorageConfig, root: Path) -> S3Sync:
    """Mirror the source into the local cache, downloading only objects whose ETag or size changed.

    The cache (`ingest.s3.cache`, git-ignored) keeps each object's file and,
    in `.etags.json`, the ETag and size it was downloaded at; objects no
    longer in the bucket are left out of the result.

    Raises:
        ConfigError: when no S3 URI is configured.
        IngestError: when the bucket cannot be listed, holds no <class>/<image> objects,
            or a download fails after its retries.
    """
    location = source_location(source)
    cache_root = resolve_path(source.cache, root)
    cache = cache_root / location.bucket / location.prefix
    client = s3.client(storage)
    wanted = _layout(location, list(s3.list_objects(client, location)))
    if not wanted:
        raise IngestError(
            f"{location}: no images found at <class>/<image> under this prefix; "
            "upload them as s3://<bucket>/<prefix>/<class>/<image>"
        )
    index_path = cache / INDEX
    index: dict[str, dict[str, object]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    files, stale = [], []
    for label, name, obj in wanted:
        local = cache / label / name
        files.append((label, name, local))
        known = index.get(obj.key)
        fresh = known == {"etag": obj.etag, "size": obj.size}
        if not (fresh and local.is_file() and local.stat().st_size == obj.size):
            stale.append((obj, local))

    def fetch(item: tuple[s3.S3Object, Path]) -> None:
        obj, local = item
        s3.download(client, location.bucket, obj, local, storage.max_attempts)
        index[obj.key] = {"etag": obj.etag, "size": obj.size}

    cache.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, stale))
    finally:  # what did download is verified: keep it for the next attempt
        index = {obj.key: index[obj.key] for _, _, obj in wanted if obj.key in index}
        partial = index_path.with_name(f".{INDEX}.partial")
        partial.write_text(json.dumps(index, indent=1, sort_keys=True))
        partial.replace(index_path)
    log.info(
        "%s: %d objects, %d downloaded, %d unchanged since the last ingest (cache %s)",
        location,
        len(files),
        len(stale),
        len(files) - len(stale),
        cache,
    )
    return S3Sync(location, cache, files, downloaded=len(stale), reused=len(files) - len(stale))


def s3_tree(source: S3Source, storage: StorageConfig, root: Path) -> tuple[int, Iterator[SourceFile]]:
    """The source's images as (count, files), after syncing the cache."""
    synced = sync(source, storage, root)

    def files() -> Iterator[SourceFile]:
        for label, name, local in synced.files:
            yield SourceFile(label, name, local.read_bytes())

    return len(synced.files), files()
