"""S3 through boto3: one client factory, listing with pagination, verified downloads with retries.

Used by the `s3` ingest source and the S3 landing area. Endpoint, bucket and
prefix come from params (`storage`, `ingest.s3.uri`, `drift.landing_s3`) or
the environment; credentials only ever from the environment or an AWS profile,
the way boto3 finds them. Nothing here logs or records a credential.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import StorageConfig
from pipeline.errors import ConfigError, IngestError

log = logging.getLogger(__name__)

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # boto3's own names, in its order
CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading slash; empty or ending in '/')."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, relative: str) -> str:
        return f"{self.prefix}{relative}"


@dataclass(frozen=True)
class S3Object:
    """One listed object."""

    key: str
    etag: str  # without quotes
    size: int
    modified: float  # POSIX seconds


def parse_uri(uri: str, what: str) -> S3Location:
    """`s3://bucket/prefix` as a location.

    Raises:
        ConfigError: naming `what` (the key or variable it came from) when the URI is not s3://bucket[/prefix].
    """
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{what}: '{uri}' is not an S3 URI; write s3://<bucket>/<prefix>")
    prefix = parts.path.strip("/")
    return S3Location(parts.netloc, f"{prefix}/" if prefix else "")


def endpoint_url(storage: StorageConfig) -> str | None:
    """`storage.endpoint_url`, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else None (AWS itself)."""
    if storage.endpoint_url:
        return storage.endpoint_url
    return next((os.environ[name] for name in ENDPOINT_ENVS if os.environ.get(name)), None)


def client(storage: StorageConfig) -> Any:
    """A boto3 S3 client: standard retry mode (throttling, 5xx, connection errors), path-style
    addressing for custom endpoints, credentials from boto3's usual chain."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url(storage)
    config = Config(
        retries={"max_attempts": storage.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint else {},
        connect_timeout=storage.timeout_seconds,
        read_timeout=storage.timeout_seconds,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=storage.region, config=config
    )


def describe_error(error: Exception) -> str:
    """One line about a boto/botocore error, without request signatures or credentials."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        details = response["Error"]
        return f"{details.get('Code', 'error')}: {details.get('Message', '')}".strip()
    return f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def list_objects(s3: Any, location: S3Location) -> Iterator[S3Object]:
    """Every object under the location, following pagination.

    Raises:
        IngestError: when the bucket cannot be listed (missing, no access, endpoint down).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = s3.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
            for item in page.get("Contents", []):
                yield S3Object(
                    key=item["Key"],
                    etag=item["ETag"].strip('"'),
                    size=int(item["Size"]),
                    modified=item["LastModified"].timestamp(),
                )
    except (BotoCoreError, ClientError) as error:
        raise IngestError(
            f"{location}: cannot list objects ({describe_error(error)}); check the bucket name, "
            "the endpoint (storage.endpoint_url or AWS_ENDPOINT_URL_S3) and the credentials (environment)"
        ) from None


class ChecksumMismatch(Exception):
    """The downloaded bytes do not match the object's size or ETag."""


def _verify(obj: S3Object, size: int, md5: str) -> None:
    if size != obj.size:
        raise ChecksumMismatch(f"got {size} bytes, the object has {obj.size}")
    # A plain PUT's ETag is the MD5 of the content; a multipart upload's ("<md5>-<parts>") is not,
    # and only its size is checked here (boto3 validates a stored CRC itself when the store sends one).
    if "-" not in obj.etag and len(obj.etag) == 32 and md5 != obj.etag:
        raise ChecksumMismatch(f"MD5 {md5} does not match the ETag {obj.etag}")


def download(s3: Any, bucket: str, obj: S3Object, target: Path, attempts: int) -> None:
    """Download one object to `target`, verified, retrying transient failures.

    The bytes go to a hidden temporary file next to `target` and are renamed
    into place only once their size and MD5 match the listing, so a failure
    never leaves a partial file under the target's name. botocore retries
    failed requests itself; this also retries a body cut short mid-stream
    and a checksum mismatch, with exponential backoff.

    Raises:
        IngestError: naming s3://bucket/key when every attempt failed.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    for attempt in range(1, attempts + 1):
        try:
            response = s3.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"')
            digest, size = hashlib.md5(usedforsecurity=False), 0
            with partial.open("wb") as out:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            _verify(obj, size, digest.hexdigest())
            partial.replace(target)
            return
        except (BotoCoreError, ClientError, ChecksumMismatch, OSError) as error:
            partial.unlink(missing_ok=True)
            code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "PreconditionFailed", "AccessDenied", "403", "404", "412"}:
                raise IngestError(
                    f"s3://{bucket}/{obj.key}: {describe_error(error)}; the object changed or vanished "
                    "while ingesting, or access is denied. Run ingest again once uploads have finished"
                ) from None
            if attempt == attempts:
                raise IngestError(
                    f"s3://{bucket}/{obj.key}: download failed after {attempts} attempts "
                    f"({describe_error(error)}); no partial file was kept. Check the endpoint and retry"
                ) from None
            delay = min(0.5 * 2 ** (attempt - 1), 8.0)
            log.warning(
                "s3://%s/%s: attempt %d/%d failed (%s); retrying in %.1f s",
                bucket,
                obj.key,
                attempt,
                attempts,
                describe_error(error),
                delay,
            )
            time.sleep(delay)


def move_objects(s3: Any, bucket: str, objects: list[S3Object], source: str, destination: str) -> int:
    """Move objects whose keys start with `source` to `destination` (copy, then delete the original).

    Returns:
        How many objects moved.
    """
    moved = 0
    for obj in objects:
        s3.copy_object(
            Bucket=bucket,
            Key=destination + obj.key[len(source) :],
            CopySource={"Bucket": bucket, "Key": obj.key},
        )
        s3.delete_object(Bucket=bucket, Key=obj.key)
        moved += 1
    return moved
