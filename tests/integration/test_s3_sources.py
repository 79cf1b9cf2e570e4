"""S3 through a real HTTP endpoint (moto's server on 127.0.0.1): ingest, landing area, DVC remote config."""

from __future__ import annotations

import time

import pytest

from pipeline import config, ingest, s3
from pipeline.errors import ConfigError, IngestError
from pipeline.ingest.s3_source import sync
from pipeline.ingest.sources import encode_png
from pipeline.monitoring import landing
from tests.conftest import copy_project, digit_images, sh, tree_digest
from tests.s3_faults import FaultyS3Proxy
from tests.servers import moto_s3

pytestmark = [pytest.mark.integration]

BUCKET = "mlops"


@pytest.fixture(scope="module")
def server():
    with moto_s3() as started:
        started.make_bucket(BUCKET)
        yield started


@pytest.fixture
def proxy(server):
    with FaultyS3Proxy(server.endpoint).running() as running:
        yield running


@pytest.fixture
def aws_env(server, monkeypatch):
    """The pipeline's credentials come from the environment, never from params."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    for name in (config.INGEST_URI_ENV, config.LANDING_URI_ENV, config.DVC_REMOTE_ENV, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def upload_tree(server, prefix: str, per_class: int = 6, classes: int = 3) -> dict[str, bytes]:
    """Digits as s3://mlops/<prefix>/<class>/img_<i>.png; returns {key: bytes}."""
    client, uploaded = server.client(), {}
    for label, images in digit_images(per_class=per_class, classes=classes).items():
        for index, pixels in enumerate(images):
            key = f"{prefix}/{label}/img_{index:03d}.png"
            uploaded[key] = encode_png(pixels)
            client.put_object(Bucket=BUCKET, Key=key, Body=uploaded[key])
    return uploaded


def source_config(make_config, prefix: str, endpoint: str, attempts: int = 3):
    return make_config(
        {
            "ingest": {"source": "s3", "s3": {"uri": f"s3://{BUCKET}/{prefix}"}},
            "storage": {"endpoint_url": endpoint, "max_attempts": attempts},
        }
    )


@pytest.mark.slow  # 1,000+ objects through the proxy: 10-30 s on 2 cores
def test_ingest_lists_past_a_page_and_downloads_only_changed_objects(server, proxy, aws_env, make_config):
    client = server.client()
    keys = [f"paged/{index % 2}/x{index:04d}.png" for index in range(1105)]  # > 1,000: a second page
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    client.put_object(Bucket=BUCKET, Key="paged/loose.png", Body=b"not in a class folder")
    cfg, paths = source_config(make_config, "paged", proxy.endpoint)

    first = sync(cfg.ingest.s3, cfg.storage, paths.root)
    assert (first.downloaded, first.reused, len(first.files)) == (1105, 0, 1105)
    assert proxy.object_gets() == 1105
    assert (first.cache / "1" / "x0001.png").read_bytes() == b"paged/1/x0001.png"

    second = sync(cfg.ingest.s3, cfg.storage, paths.root)
    assert (second.downloaded, second.reused) == (0, 1105)
    assert proxy.object_gets() == 1105  # nothing fetched again: same ETags

    client.put_object(Bucket=BUCKET, Key="paged/0/x0000.png", Body=b"changed")
    client.delete_object(Bucket=BUCKET, Key="paged/1/x0003.png")
    third = sync(cfg.ingest.s3, cfg.storage, paths.root)
    assert (third.downloaded, third.reused, len(third.files)) == (1, 1103, 1104)
    assert proxy.gets["paged/0/x0000.png"] == 2
    assert (third.cache / "0" / "x0000.png").read_bytes() == b"changed"
    assert "paged/1/x0003.png" not in {f"paged/{label}/{name}" for label, name, _ in third.files}


def test_transient_errors_are_retried_and_leave_no_partial_files(server, proxy, aws_env, make_config):
    uploaded = upload_tree(server, "flaky")
    proxy.fail("flaky/0/img_000.png", "503", "cut")  # botocore retries the 503; the pipeline the cut body
    proxy.fail("flaky/1/img_001.png", "cut", "cut")
    cfg, paths = source_config(make_config, "flaky", proxy.endpoint)

    result = ingest.run(cfg, paths)

    assert result.files == len(uploaded) == 18
    assert proxy.gets["flaky/0/img_000.png"] == 3
    assert proxy.gets["flaky/1/img_001.png"] == 3
    for key, data in uploaded.items():
        assert (paths.raw / key.removeprefix("flaky/")).read_bytes() == data
    assert not [p for p in paths.root.rglob("*") if "partial" in p.name]


def test_a_download_that_keeps_failing_names_the_object_and_keeps_raw_intact(
    server, proxy, aws_env, make_config
):
    upload_tree(server, "broken")
    cfg, paths = source_config(make_config, "broken", proxy.endpoint, attempts=2)
    (paths.raw / "old").mkdir(parents=True)
    (paths.raw / "old" / "kept.png").write_bytes(b"from the last ingest")
    before = tree_digest(paths.raw)
    proxy.fail("broken/2/img_004.png", "cut", "cut", "cut")

    with pytest.raises(IngestError, match=r"s3://mlops/broken/2/img_004\.png: download failed after 2"):
        ingest.run(cfg, paths)

    assert tree_digest(paths.raw) == before
    assert not [p for p in paths.root.rglob("*") if "partial" in p.name]
    cached = paths.root / ".cache/s3/mlops/broken"
    assert not (cached / "2" / "img_004.png").exists()
    assert len(list(cached.rglob("*.png"))) == 17  # the verified ones are kept for the next attempt


def test_missing_uri_and_missing_bucket_say_what_to_set(server, aws_env, make_config, monkeypatch):
    params = {"ingest": {"source": "s3"}, "storage": {"endpoint_url": server.endpoint}}
    cfg, paths = make_config(params)
    with pytest.raises(ConfigError, match=r"ingest\.s3\.uri or PIPELINE_INGEST_S3_URI"):
        ingest.run(cfg, paths)
    monkeypatch.setenv(config.INGEST_URI_ENV, "s3://no-such-bucket/images")
    cfg, paths = make_config(params)  # the variable is applied when the config is loaded
    with pytest.raises(IngestError, match=r"s3://no-such-bucket/images/: cannot list objects \(NoSuchBucket"):
        ingest.run(cfg, paths)
    monkeypatch.setenv(config.INGEST_URI_ENV, "mlops/images")
    with pytest.raises(
        ConfigError, match="ingest.s3.uri: PIPELINE_INGEST_S3_URI: 'mlops/images' is not an S3 URI"
    ):
        make_config(params)


def test_environment_uri_overrides_params(server, aws_env, make_config, monkeypatch, tmp_path):
    upload_tree(server, "from-env", per_class=2)
    monkeypatch.setenv(config.INGEST_URI_ENV, f"s3://{BUCKET}/from-env")
    cfg, _ = make_config(
        {
            "ingest": {"s3": {"uri": f"s3://{BUCKET}/somewhere-else"}},
            "storage": {"endpoint_url": server.endpoint},
        }
    )
    assert cfg.ingest.s3.uri == f"s3://{BUCKET}/from-env"
    source = cfg.ingest.s3.model_copy(update={"cache": tmp_path / "cache"})
    assert len(sync(source, cfg.storage, tmp_path).files) == 6


def test_landing_area_pulls_settled_batches_and_moves_them_to_received(server, aws_env, make_config):
    uploaded = upload_tree(server, "landing/batch-a", per_class=3)
    client = server.client()
    client.put_object(Bucket=BUCKET, Key="landing/_received/old/0/x.png", Body=b"earlier")
    cfg, paths = make_config({"storage": {"endpoint_url": server.endpoint}})
    location = s3.parse_uri(f"s3://{BUCKET}/landing", "drift.landing_s3")
    local = paths.root / "data" / "landing"

    assert landing.pull_s3_batches(location, local, 3600.0, cfg.storage) == []  # just uploaded: not settled
    assert not local.exists() or not any(local.iterdir())

    assert landing.pull_s3_batches(location, local, 0.0, cfg.storage) == ["batch-a"]
    for key, data in uploaded.items():
        path = local / key.removeprefix("landing/")
        assert path.read_bytes() == data
        assert abs(path.stat().st_mtime - time.time()) < 600  # the object's upload time, not 1970
    batch = landing.read_batch(local / "batch-a")
    assert batch.labelled and len(batch.files) == 9
    left = {o.key for o in s3.list_objects(client, s3.S3Location(BUCKET, "landing/"))}
    assert left == {"landing/_received/old/0/x.png"} | {
        key.replace("landing/", "landing/_received/", 1) for key in uploaded
    }
    assert landing.pull_s3_batches(location, local, 0.0, cfg.storage) == []  # nothing new

    upload_tree(server, "landing/batch-a", per_class=1)  # the same name again, while batch-a is still local
    assert landing.pull_s3_batches(location, local, 0.0, cfg.storage) == []
    assert len(list(s3.list_objects(client, s3.S3Location(BUCKET, "landing/batch-a/")))) == 3


def test_dvc_remote_is_written_from_params_or_environment_without_credentials(server, tmp_path):
    def edit(params: dict) -> None:
        params["storage"]["dvc_remote"] = "s3://mlops/from-params"
        params["storage"]["endpoint_url"] = server.endpoint

    project = tmp_path / "project"
    project.mkdir()
    copy_project(project, edit)
    secret = "do-not-write-this-secret"
    env = {**server.env(), "AWS_SECRET_ACCESS_KEY": secret}
    output = sh(project, "python", "-m", "pipeline", "dvc-remote", env=env)
    dvc_config = (project / ".dvc" / "config").read_text()
    assert "url = s3://mlops/from-params" in dvc_config
    assert f"endpointurl = {server.endpoint}" in dvc_config
    assert "remote = storage" in dvc_config

    output += sh(
        project,
        "python",
        "-m",
        "pipeline",
        "dvc-remote",
        env={**env, config.DVC_REMOTE_ENV: "s3://mlops/env/"},
    )
    dvc_config = (project / ".dvc" / "config").read_text()
    assert "url = s3://mlops/env" in dvc_config and "from-params" not in dvc_config
    assert secret not in dvc_config and not any(
        secret in p.read_text(errors="ignore") for p in (project / ".dvc").rglob("config*")
    )
    assert secret not in output  # nor echoed by the command
