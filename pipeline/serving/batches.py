"""Landing batches cut from served traffic: a folder that appears whole, or objects under an S3 prefix.

The drift check's landing contract (pipeline/monitoring/landing.py):
`<landing>/<batch>/<image>` unlabelled, `<landing>/<batch>/<class>/<image>` labelled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import s3
from pipeline.config import StorageConfig


def write_batch(
    name: str, files: dict[str, Path], landing: Path, landing_s3: str | None, storage: StorageConfig
) -> str:
    """Copy `files` ({path in the batch: source}) into batch `name`; returns where it went.

    Locally the batch is written into a hidden folder and renamed into place, so the drift check
    sees it whole or not at all (the hidden folder is removed if a copy fails). With `landing_s3`
    each file is uploaded under `<prefix><name>/`: S3 has no multi-object commit, so the landing
    pull waits `drift.settle_seconds` for the upload to finish.
    """
    if landing_s3:
        location = s3.parse_uri(landing_s3, "drift.landing_s3")
        client = s3.client(storage)
        for relative, source in files.items():
            client.upload_file(str(source), location.bucket, location.key(f"{name}/{relative}"))
        return f"s3://{location.bucket}/{location.key(name)}/"
    staging = landing / f".cut-{name}"
    try:
        for relative, source in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        staging.rename(landing / name)  # the batch appears whole
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only when a copy failed
    return str(landing / name)
