"""Deployments of the training, drift-check and tuning flows, with schedules from params.yaml.

`python -m flows.deployments` registers them with the Prefect server named by
PREFECT_API_URL (creating the process work pool if missing); a worker started
with `prefect worker start --pool <work_pool>` then runs them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from flows.retraining import drift_check_flow
from flows.training import PROJECT_ROOT, training_flow
from flows.tuning import tuning_flow
from pipeline.config import OrchestrationConfig, load_config


def build_deployments(cfg: OrchestrationConfig, root: Path = PROJECT_ROOT) -> list[RunnerDeployment]:
    """The `training` and `drift-check` deployments, and `tuning` (run on demand, no schedule).

    Training has a concurrency limit of one with queueing, so two triggers
    (a schedule and a drift alarm, say) never train at the same time. Tuning
    has no limit: runs on several workers share one study (params.yaml `tune.storage`).
    """
    # from_source: the worker pulls the code from this folder (a set-working-directory step),
    # so it runs the project in place, whatever folder the worker was started in.
    source = str(root)
    training = training_flow.from_source(source, "flows/training.py:training_flow").to_deployment(
        name="training",
        cron=cfg.training_cron,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        parameters={"root": str(root)},
        work_pool_name=cfg.work_pool,
        description="The stage graph, ingest to register, as Prefect tasks",
        tags=["training"],
    )
    drift = drift_check_flow.from_source(source, "flows/retraining.py:drift_check_flow").to_deployment(
        name="drift-check",
        cron=cfg.drift_check_cron,
        concurrency_limit=1,
        parameters={"root": str(root)},
        work_pool_name=cfg.work_pool,
        description="Checks new image batches for drift; retrains, gates and promotes when they drifted",
        tags=["drift"],
    )
    tuning = tuning_flow.from_source(source, "flows/tuning.py:tuning_flow").to_deployment(
        name="tuning",
        parameters={"root": str(root)},
        work_pool_name=cfg.work_pool,
        description="An Optuna study over the train recipe; trials are nested MLflow runs, the best params "
        "a params.yaml patch (never applied)",
        tags=["tuning"],
    )
    for deployment in (training, drift):
        for schedule in deployment.schedules or []:
            schedule.schedule.timezone = cfg.timezone
    return [training, drift, tuning]


async def ensure_work_pool(name: str) -> None:
    """Create the process work pool when the server does not have it yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def register_deployments(root: Path = PROJECT_ROOT) -> list[str]:
    """Create the work pool if needed and apply the deployments; returns their ids."""
    cfg = load_config(root / "params.yaml", root).orchestration
    asyncio.run(ensure_work_pool(cfg.work_pool))
    return [
        str(deployment.apply(work_pool_name=cfg.work_pool)) for deployment in build_deployments(cfg, root)
    ]


if __name__ == "__main__":
    for deployment_id in register_deployments():
        print(f"deployment {deployment_id}")
