"""The whole pipeline on the team backends, every one a real server started here.

PostgreSQL (a cluster in a temporary folder), the project's MLflow server on
it (mlflow/start-server.sh) with its artifacts in S3, and moto's S3 server
over HTTP on 127.0.0.1, reached by the pipeline through a proxy that fails
some downloads. Then: `dvc push` and `dvc pull` in a fresh clone, the
champion loaded in another process by alias, the drift-check flow pulling a
batch from the S3 landing area, and the tracking server stopped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import psycopg2
import pytest
import yaml

from pipeline.ingest.sources import encode_png
from tests.conftest import (
    FAST_RECIPE,
    NO_AUGMENT,
    OPTIONAL_PARTS_OFF,
    copy_project,
    digit_images,
    merge,
    sh,
    tree_digest,
)
from tests.s3_faults import FaultyS3Proxy
from tests.servers import mlflow_server, moto_s3, postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "mlops"
MODEL = "team-model"
SECRET = "pipeline-secret-must-not-leak-7f3a"  # the pipeline's AWS secret key (moto accepts any)
FLAKY = {"images/0/img_000.png": ("503", "cut"), "images/1/img_001.png": ("cut",)}


@pytest.fixture(scope="module")
def backends():
    """PostgreSQL, S3 and the MLflow server (its artifacts under s3://mlops/mlflow-artifacts)."""
    with postgres(["mlflow"]) as pg, moto_s3() as s3_server:
        s3_server.make_bucket(BUCKET)
        store = pg.url("mlflow")
        with (
            mlflow_server(
                store, f"s3://{BUCKET}/mlflow-artifacts", s3_server.endpoint, s3_server.env()
            ) as ml,
            FaultyS3Proxy(s3_server.endpoint).running() as proxy,
        ):
            yield SimpleNamespace(pg=pg, store=store, s3=s3_server, mlflow=ml, proxy=proxy)


@pytest.fixture(scope="module")
def team(backends, tmp_path_factory):
    """A project whose images are in S3, run with `dvc repro` against the backends."""
    uploaded = {}
    client = backends.s3.client()
    for label, images in digit_images(per_class=30, classes=3).items():
        for index, pixels in enumerate(images):
            key = f"images/{label}/img_{index:03d}.png"
            uploaded[key] = encode_png(pixels)
            client.put_object(Bucket=BUCKET, Key=key, Body=uploaded[key])

    def edit(params: dict) -> None:
        params["ingest"]["source"] = "s3"
        params["ingest"]["s3"]["uri"] = f"s3://{BUCKET}/images"
        params["validate"]["min_images_per_class"] = 5
        params["train"].update({"epochs": 8, "batch_size": 8, **FAST_RECIPE, "augment": NO_AUGMENT})
        params["export"]["calibration_images"] = 20
        params["gate"].update(
            {"min_accuracy": 0.5, "min_macro_f1": 0.5, "min_margin_over_baseline": -1.0}
            | {"max_int8_accuracy_drop": 0.3}
        )
        merge(params, copy.deepcopy(OPTIONAL_PARTS_OFF))  # the backends are under test
        params["mlflow"].update({"registered_model": MODEL, "connect_timeout_seconds": 5})
        params["storage"]["max_attempts"] = 3

    project = tmp_path_factory.mktemp("team") / "project"
    project.mkdir()
    copy_project(project, edit)
    env = {
        "MLFLOW_TRACKING_URI": backends.mlflow.uri,
        "AWS_ACCESS_KEY_ID": "pipeline",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": backends.proxy.endpoint,  # moto, behind the fault-injecting proxy
        "PIPELINE_DVC_REMOTE_URL": f"s3://{BUCKET}/dvc-store",
        "PIPELINE_LANDING_S3_URI": f"s3://{BUCKET}/landing",
    }
    for key, faults in FLAKY.items():
        backends.proxy.fail(key, *faults)
    output = sh(project, "dvc", "repro", env=env)
    return SimpleNamespace(project=project, env=env, output=output, uploaded=uploaded)


def dvc_outs(project: Path) -> list[str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def test_pipeline_runs_on_postgres_mlflow_and_s3(backends, team):
    project = team.project
    # Ingest retried the 503 and the cut-off bodies, and kept exactly the bytes in S3.
    for key, faults in FLAKY.items():
        assert backends.proxy.gets[key] == len(faults) + 1, key
    for key, data in team.uploaded.items():
        assert (project / "data/raw" / key.removeprefix("images/")).read_bytes() == data
    assert not [p for p in project.rglob("*") if p.name.endswith(".partial")]

    # Tracking and registry through the server; the registry's rows in PostgreSQL.
    client = mlflow.MlflowClient(backends.mlflow.uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id)
    assert run.data.params["ingest.source"] == "s3"
    evaluated = json.loads((project / "reports/metrics.json").read_text())["accuracy"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluated)  # what evaluate measured
    with psycopg2.connect(backends.store) as db, db.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models")
        assert (MODEL,) in cursor.fetchall()
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (champion.run_id,))
        assert cursor.fetchone() == (1,)

    # Artifacts went through the server into S3 (the pipeline has no MLflow S3 settings).
    keys = [
        o["Key"]
        for page in backends.s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix="mlflow-artifacts/")
        for o in page.get("Contents", [])
    ]
    assert any(key.endswith("/MLmodel") for key in keys)
    assert any("drift_reference/" in key for key in keys)

    # The credential is in the environment only: not in logs, params, MLflow or the project's files.
    assert SECRET not in team.output
    recorded = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in recorded
    for name in ("params.yaml", "dvc.lock", ".dvc/config"):
        assert SECRET not in (project / name).read_text()


def test_dvc_push_then_pull_in_a_fresh_clone_restores_identical_data(backends, team, tmp_path):
    project = team.project
    env = {**team.env, "AWS_ENDPOINT_URL_S3": backends.s3.endpoint}  # straight to S3, not through the proxy
    sh(project, "python", "-m", "pipeline", "dvc-remote", env=env)
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "run and remote")
    pushed = sh(project, "dvc", "push", env=env)
    assert "pushed" in pushed

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    outs = dvc_outs(project)
    assert "data/raw" in outs and any(out.startswith("models") for out in outs)
    assert not (clone / "data/raw").exists()
    sh(clone, "dvc", "pull", env=env)
    for out in outs:
        source, restored = project / out, clone / out
        if source.is_dir():
            assert tree_digest(restored) == tree_digest(source), out
        else:
            assert restored.read_bytes() == source.read_bytes(), out
    assert "up to date" in sh(clone, "dvc", "status", env=env).lower()


def test_champion_loads_in_a_second_process_by_alias(backends, team):
    """Only MLFLOW_TRACKING_URI: no AWS variables, the artifacts come through the server."""
    inputs = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    np.save(team.project / "probe.npy", inputs)
    script = (
        "import json, sys, mlflow, numpy as np\n"
        f"model = mlflow.tensorflow.load_model('models:/{MODEL}@champion')\n"
        "print(json.dumps(np.asarray(model.predict(np.load('probe.npy'), verbose=0)).tolist()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(MLFLOW_TRACKING_URI=backends.mlflow.uri, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=team.project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = np.array(json.loads(done.stdout.strip().splitlines()[-1]))

    import keras

    local = keras.models.load_model(team.project / "models" / "keras" / "model.keras")
    assert remote.shape == (4, 3)
    np.testing.assert_allclose(remote, local.predict(inputs, verbose=0), atol=1e-5)


def test_drift_check_pulls_a_batch_from_the_s3_landing_area(backends, team, monkeypatch):
    """The champion from the server's registry checks a batch uploaded to s3://mlops/landing/."""
    from prefect.testing.utilities import prefect_test_harness

    client = backends.s3.client()
    val = [
        line.split(",")[:2] for line in (team.project / "data/splits/val.csv").read_text().splitlines()[1:]
    ]
    for path, label in val:  # the reference's own images: no drift
        key = f"landing/same-digits/{label}/{Path(path).name}"
        client.put_object(Bucket=BUCKET, Key=key, Body=(team.project / path).read_bytes())
    for name, value in team.env.items():
        monkeypatch.setenv(name, value)
    from flows.retraining import drift_check_flow

    with prefect_test_harness(server_startup_timeout=120):
        summary = drift_check_flow(root=str(team.project), settle_seconds=0)

    assert summary["champion"].startswith(f"{MODEL} v")
    assert summary["pulled_from_s3"] == ["same-digits"]
    assert summary["batches"]["same-digits"] == "no drift"
    archived = team.project / "data/landing_archive/processed/same-digits"
    assert len(list(archived.rglob("*.png"))) == len(val) > 10
    received = client.list_objects_v2(Bucket=BUCKET, Prefix="landing/_received/same-digits/")
    assert received["KeyCount"] == len(val)
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="landing/same-digits/")["KeyCount"] == 0


def test_with_the_tracking_server_stopped_the_pipeline_fails_fast_naming_it(backends, team):
    backends.mlflow.stop()
    uri = backends.mlflow.uri
    for command in (["python", "-m", "pipeline", "train"], ["python", "-m", "flows.training"]):
        started = time.monotonic()
        output = sh(team.project, *command, check=False, env=team.env)
        elapsed = time.monotonic() - started
        assert f"MLflow tracking server {uri} is not reachable" in output, output[-2000:]
        assert elapsed < 120, (command, elapsed)
