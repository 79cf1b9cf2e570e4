"""The deployments on a Prefect server backed by PostgreSQL, run by a process worker, both started by the
project's own scripts (infra/prefect/start-server.sh, start-worker.sh)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg2
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipeline.config import load_config
from tests.integration.test_flows import small_project
from tests.servers import postgres, prefect_server, prefect_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def scheduled_runs(client, deployment: str) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
        flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
    )


@pytest.mark.timeout(900)
def test_deployments_schedule_and_run_through_a_worker_on_postgresql(tmp_path: Path):
    project = small_project(tmp_path / "project")
    pool = load_config(project / "params.yaml", project).orchestration.work_pool
    with postgres(["prefect"]) as pg, prefect_server(pg.url("prefect", "postgresql+asyncpg")) as server:
        with prefect_worker(server.api_url, project), temporary_settings({PREFECT_API_URL: server.api_url}):
            with get_client(sync_client=True) as client:
                training = client.read_deployment_by_name("training/training")
                drift = client.read_deployment_by_name("drift-check/drift-check")
                assert training.work_pool_name == drift.work_pool_name == pool
                for deployment in (training, drift):  # the copy's code, registered by the worker script
                    step = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
                    assert Path(step["directory"]).resolve() == project.resolve()
                # The scheduler fills the cron schedule in PostgreSQL (broken by SQLAlchemy 2.1).
                deadline = time.monotonic() + 90
                while not (upcoming := scheduled_runs(client, "training")) and time.monotonic() < deadline:
                    time.sleep(3)
                assert upcoming, "the scheduler created no runs of the training deployment"
                assert all(run.expected_start_time.weekday() == 0 for run in upcoming)  # Mondays 03:00

            trained = run_deployment("training/training", parameters={"epochs": 12}, timeout=600)
            assert trained.state.is_completed(), trained.state
            registered = json.loads((project / "reports" / "register.json").read_text())
            # A completed flow passed the gate (a failed one raises GateFailed): the first model is champion.
            assert registered["alias"] == "champion", registered

            checked = run_deployment("drift-check/drift-check", timeout=300)
            assert checked.state.is_completed(), checked.state

        # The runs this test started are recorded in PostgreSQL. (The hourly drift-check schedule may add
        # runs of its own while the test runs, so only these two are looked up.)
        with psycopg2.connect(pg.url("prefect")) as db, db.cursor() as cursor:
            cursor.execute(
                "SELECT d.name, r.state_type FROM flow_run r JOIN deployment d ON r.deployment_id = d.id "
                "WHERE r.id IN (%s, %s) ORDER BY d.name",
                (str(checked.id), str(trained.id)),
            )
            assert cursor.fetchall() == [("drift-check", "COMPLETED"), ("training", "COMPLETED")]
