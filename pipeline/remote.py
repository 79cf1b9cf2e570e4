"""The DVC remote on S3: `python -m pipeline dvc-remote` writes it into DVC's config."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pipeline import children, config, s3
from pipeline.config import StorageConfig
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

REMOTE_NAME = "storage"


def remote_url(storage: StorageConfig) -> str:
    """`storage.dvc_remote` (which PIPELINE_DVC_REMOTE_URL overrides), checked to be s3://bucket/prefix.

    Raises:
        ConfigError: when none is set or the value is not an S3 URI.
    """
    if not storage.dvc_remote:
        raise ConfigError(
            f"no DVC remote configured: set storage.dvc_remote in params.yaml or {config.DVC_REMOTE_ENV} "
            "to s3://<bucket>/<prefix>"
        )
    return str(s3.parse_uri(storage.dvc_remote, "storage.dvc_remote")).rstrip("/")


def _dvc(root: Path, *args: str) -> None:
    done = subprocess.run(  # a killed pipeline takes its dvc process with it (pipeline/children.py)
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        preexec_fn=children.die_with_parent(),
    )
    if done.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")


def configure_remote(storage: StorageConfig, root: Path, local: bool = False) -> str:
    """Make the S3 remote DVC's default, as `dvc remote add -d` would.

    The URL (and `storage.endpoint_url` or `storage.region` when set) go to
    `.dvc/config`, to be committed so a fresh clone can `dvc pull`; with
    `local`, to the git-ignored `.dvc/config.local` instead. An endpoint given
    only as AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL is not written: DVC reads
    those variables itself. Credentials are never written: DVC takes them from
    the environment or an AWS profile, as boto3 does.

    Returns:
        The remote's URL.
    """
    url = remote_url(storage)
    scope = ["--local"] if local else []
    _dvc(root, "remote", "add", *scope, "--force", "--default", REMOTE_NAME, url)
    for option, value in (("endpointurl", storage.endpoint_url), ("region", storage.region)):
        if value:
            _dvc(root, "remote", "modify", *scope, REMOTE_NAME, option, value)
        else:
            _dvc(root, "remote", "modify", *scope, "--unset", REMOTE_NAME, option)
    endpoint = s3.endpoint_url(storage) or "AWS S3"
    where = ".dvc/config.local" if local else ".dvc/config"
    log.info("DVC remote '%s' -> %s (endpoint %s) in %s", REMOTE_NAME, url, endpoint, where)
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        log.info("no AWS_ACCESS_KEY_ID or AWS_PROFILE: DVC will try its other credential sources")
    return url
