"""The MLflow server as deployed: runs in PostgreSQL, artifacts in S3 through the server.

Real processes over real sockets (tests/servers.py): PostgreSQL, moto's S3 server and
the project's mlflow/start-server.sh. The client holds no AWS credentials.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import psycopg2
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.servers import mlflow_server, moto_s3, postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACT_PREFIX = "mlflow-artifacts"


@pytest.fixture
def point_mlflow_at(monkeypatch: pytest.MonkeyPatch):
    """Point this process's MLflow client at a server, as MLFLOW_TRACKING_URI would; undone afterwards."""

    def point(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)

    yield point
    mlflow.set_tracking_uri(None)  # back to resolving from the environment, as before the test


def drop_aws_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client must reach artifacts through the server alone, with no S3 access of its own."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)


def log_a_run(note: Path) -> tuple[str, str]:
    """One run with a param, a metric and a file artifact; returns (experiment_id, run_id)."""
    experiment_id = mlflow.set_experiment("server-smoke").experiment_id
    with mlflow.start_run() as run:
        mlflow.log_param("learning_rate", "0.01")
        mlflow.log_metric("accuracy", 0.9)
        mlflow.log_artifact(str(note))
    return experiment_id, run.info.run_id


def stored_run(database_url: str, run_id: str) -> tuple[str, str, float]:
    """(status, learning_rate param, accuracy metric) of `run_id` read from MLflow's tables."""
    with psycopg2.connect(database_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT r.status, p.value, m.value FROM runs r"
            " JOIN params p ON p.run_uuid = r.run_uuid AND p.key = 'learning_rate'"
            " JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'accuracy'"
            " WHERE r.run_uuid = %s",
            (run_id,),
        )
        rows = cursor.fetchall()
    connection.close()
    assert len(rows) == 1, f"run {run_id} not in PostgreSQL: {rows}"
    return rows[0]


@pytest.mark.timeout(240)
def test_mlflow_server_keeps_runs_in_postgres_and_artifacts_in_s3(tmp_path, monkeypatch, point_mlflow_at):
    note = tmp_path / "note.txt"
    note.write_text("served through the tracking server\n")
    with postgres(["mlflow"]) as pg, moto_s3() as s3:
        s3.make_bucket("mlops")
        backend = pg.url("mlflow")
        destination = f"s3://mlops/{ARTIFACT_PREFIX}"
        with mlflow_server(backend, destination, s3.endpoint, s3.env()) as server:
            drop_aws_settings(monkeypatch)
            point_mlflow_at(server.uri)

            experiment_id, run_id = log_a_run(note)

            run = MlflowClient().get_run(run_id)
            assert run.data.params == {"learning_rate": "0.01"}
            assert run.data.metrics == {"accuracy": 0.9}
            assert [item.path for item in MlflowClient().list_artifacts(run_id)] == ["note.txt"]

            listed = s3.client().list_objects_v2(Bucket="mlops", Prefix=f"{ARTIFACT_PREFIX}/")
            keys = [item["Key"] for item in listed.get("Contents", [])]
            assert keys == [f"{ARTIFACT_PREFIX}/{experiment_id}/{run_id}/artifacts/note.txt"]

            assert stored_run(pg.url("mlflow"), run_id) == ("FINISHED", "0.01", 0.9)

            server.stop()
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            with pytest.raises(MlflowException, match="API request"):
                MlflowClient().get_run(run_id)
