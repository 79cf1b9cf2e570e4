"""`make tune` for real: Optuna trials that train, nested MLflow runs, pruning, a study shared by two
processes on PostgreSQL, a killed run resumed, and the tuning flow on Prefect.

One small project (3 classes of 15 digits, split once) is copied for each test;
trials train 2 short epochs, so a trial takes a few seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.config import load_config, parse_config, with_overrides
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths
from tests.conftest import FAST_RECIPE, NO_AUGMENT, copy_project, digit_images, sh, write_tree
from tests.servers import postgres, venv_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TRAIN = {"epochs": 2, "batch_size": 4, "image_size": 32, **FAST_RECIPE, "min_steps_per_epoch": 8}
TUNE = {
    "trials": 2,
    "pruner": "none",
    "heartbeat_seconds": 1,
    "grace_seconds": 2,
    "space": {"batch_size": [4], "width": [16, 32]},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git copy of the project after ingest, validate and split, with short trials in params.yaml."""
    from pipeline import ingest, split, validate

    base = tmp_path_factory.mktemp("tune")
    source = write_tree(base / "images", digit_images(per_class=15))

    def edit(params: dict) -> None:
        params["ingest"].update({"source": "folder", "folder": {"path": str(source)}})
        params["validate"]["min_images_per_class"] = 5
        params["train"].update({**TRAIN, "augment": NO_AUGMENT})
        params["tune"].update(TUNE)

    root = base / "project"
    root.mkdir()
    copy_project(root, edit)
    cfg = load_config(root / "params.yaml", root)
    paths = StagePaths.from_config(cfg.paths, root)
    for stage in (ingest, validate, split):
        stage.run(cfg, paths)  # type: ignore[attr-defined]
    return root


@pytest.fixture
def project(prepared: Path, tmp_path: Path) -> Path:
    """A fresh copy of the prepared project: its own study, MLflow store and reports."""
    return Path(shutil.copytree(prepared, tmp_path / "project", symlinks=True))


def config(root: Path, **overrides: Any):
    """The project's config with dotted overrides, e.g. {"tune.trials": 2}, and its paths."""
    cfg = load_config(root / "params.yaml", root)
    cfg = parse_config(with_overrides(cfg.model_dump(mode="json", by_alias=True), overrides))
    return cfg, StagePaths.from_config(cfg.paths, root)


def start_tune(root: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m pipeline tune` in the project, as `make tune` runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "tune"],
        cwd=root,
        env=venv_env({"GX_ANALYTICS_ENABLED": "False", **(env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def local_study(root: Path, name: str = "image-classifier-tuning") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / '.cache/tune/optuna.db'}")


def running_trials_with_an_epoch(database: Path) -> list[int]:
    """Numbers of RUNNING trials that reported an epoch, read without writing anything.

    Optuna's storage creates and stamps its tables when opened; opening it while the tuning
    process does the same races on them (IntegrityError on alembic_version, once under xdist).
    A read-only SQLite connection cannot create anything, so polling never interferes.
    """
    if not database.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute(
                "SELECT DISTINCT t.number FROM trials t"
                " JOIN trial_intermediate_values v ON v.trial_id = t.trial_id"
                " WHERE t.state = 'RUNNING'"
            ).fetchall()
    except sqlite3.OperationalError:  # no tables yet, or locked while being written
        return []
    return sorted(number for (number,) in rows)


def tracking(root: Path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_make_tune_runs_trials_as_nested_runs_and_writes_a_patch_it_never_applies(project: Path):
    committed = (project / "params.yaml").read_bytes()
    output = finish(start_tune(project))

    report = json.loads((project / "reports/tune.json").read_text())
    assert report["counts"]["complete"] == 2 and report["target_trials"] == 2, report
    assert set(report["best_params"]) >= {"train.learning_rate", "train.width", "train.augment.zoom"}
    assert "train.fine_tune.learning_rate" not in report["best_params"]  # small_cnn: no base to fine-tune
    assert report["storage"].startswith("sqlite:///") and "val_accuracy" in output

    assert (project / "params.yaml").read_bytes() == committed
    assert sh(project, "git", "status", "--porcelain", "params.yaml") == ""
    sh(project, "git", "apply", "--check", "reports/tune.patch")
    sh(project, "git", "apply", "reports/tune.patch")
    applied = load_config(project / "params.yaml", project)
    for key, value in report["best_params"].items():
        assert functools.reduce(getattr, key.split("."), applied) == pytest.approx(value, rel=1e-3), key

    client = tracking(project)
    experiment = client.get_experiment_by_name("image-classification")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.run_id for run in parents] == [report["mlflow_parent_run_id"]]
    parent = parents[0]
    children = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    assert sorted(run.info.run_name for run in children) == ["trial-0", "trial-1"]
    for child in children:
        assert (
            child.data.tags["optuna.state"] == "COMPLETE"
            and child.data.tags["optuna.study"] == report["study_name"]
        )
        assert "train.learning_rate" in child.data.params and "best_val_accuracy" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 2  # one per epoch
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(report["best_value"])
    assert parent.data.params["best.train.width"] == str(report["best_params"]["train.width"])
    assert parent.data.tags["optuna.study"] == report["study_name"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "tuning")}
    assert {
        "tuning/tune.json",
        "tuning/tune.patch",
        "tuning/tune_optimization_history.html",
        "tuning/tune_param_importances.html",
    } <= artifacts


def test_a_lagging_trial_is_pruned(project: Path):
    from pipeline import tune

    cfg, paths = config(
        project,
        **{"tune.study_name": "pruning", "tune.trials": 2, "tune.pruner": "median"},
        **{"tune.pruner_startup_trials": 1, "tune.pruner_warmup_epochs": 0},
        # Longer epochs at a fixed batch: the good trial is clearly above chance by its second epoch.
        **{"train.epochs": 3, "train.min_steps_per_epoch": 32, "train.min_batch_size": 4},
    )
    fixed = {"train.batch_size": 4, "train.weight_decay": 1e-4, "train.dropout": 0.0, "train.width": 32}
    fixed |= {f"train.augment.{name}": 0.0 for name in ("zoom", "translation", "rotation", "contrast")}
    study = optuna.create_study(
        study_name="pruning", storage=tune.study.storage_url(cfg.tune, paths), direction="maximize"
    )
    study.enqueue_trial({**fixed, "train.learning_rate": 3e-3})
    study.enqueue_trial({**fixed, "train.learning_rate": 1e-7})  # cannot learn in 3 epochs
    result = tune.run(cfg, paths)

    assert result.counts["complete"] == 1 and result.counts["pruned"] == 1, result.counts
    good, bad = local_study(project, "pruning").trials
    assert bad.state == TrialState.PRUNED and len(bad.intermediate_values) < 3
    run = tracking(project).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"
    assert result.best_trial == good.number


def test_tuning_without_splits_names_the_file_and_the_command(tmp_path: Path):
    from pipeline import tune

    root = tmp_path / "empty"
    root.mkdir()
    cfg, paths = config(Path(__file__).resolve().parents[2])
    paths = StagePaths.from_config(cfg.paths, root)
    with pytest.raises(PipelineError, match=r"data/splits/train\.csv not found; .*`dvc repro split`"):
        tune.run(cfg, paths)


def test_two_processes_share_one_postgresql_study_and_stop_at_its_total(project: Path, tmp_path: Path):
    second = Path(shutil.copytree(project, tmp_path / "second-machine", symlinks=True))
    from flows.training import write_overrides

    for root in (project, second):
        write_overrides(root / "params.yaml", {"tune.trials": 3, "tune.study_name": "shared"})
    with postgres(["optuna"]) as pg:
        url = pg.url("optuna")
        processes = [start_tune(root, {"PIPELINE_TUNE_STORAGE": url}) for root in (project, second)]
        outputs = [finish(process) for process in processes]
        trials = optuna.load_study(study_name="shared", storage=url).trials

    finished = [trial for trial in trials if trial.state in FINISHED]
    assert len(finished) == 3, [(t.number, t.state) for t in trials]
    assert len({trial.number for trial in trials}) == len(trials)
    assert all(
        t.state == TrialState.FAIL and t.user_attrs.get("surplus") for t in trials if t not in finished
    )
    workers = {trial.user_attrs["worker"] for trial in finished}
    assert len(workers) == 2, workers  # both processes trained trials
    for root, output in zip((project, second), outputs, strict=True):
        assert "postgresql://postgres@" in json.loads((root / "reports/tune.json").read_text())["storage"]
        assert "study shared" in output


def test_a_killed_run_resumes_the_study_and_its_running_trial_is_retried(project: Path):
    from flows.training import write_overrides

    write_overrides(project / "params.yaml", {"train.epochs": 3, "tune.trials": 3})
    process = start_tune(project)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        running = running_trials_with_an_epoch(project / ".cache/tune/optuna.db")
        if [number for number in running if number >= 1]:
            break
    else:
        process.kill()
        pytest.fail(f"no second trial got to an epoch:\n{process.communicate()[0][-3000:]}")
    os.kill(process.pid, signal.SIGKILL)  # the machine dies mid-trial
    process.communicate()
    (killed,) = [t for t in local_study(project).trials if t.number == min(n for n in running if n >= 1)]
    assert local_study(project).trials[killed.number].state == TrialState.RUNNING

    finish(start_tune(project))
    trials = local_study(project).trials
    assert trials[killed.number].state == TrialState.FAIL  # no heartbeat: failed, then retried
    (retry,) = [
        t for t in trials if t.user_attrs.get("origin") == killed.number and t.number != killed.number
    ]
    # pruner none: nothing is pruned, so the retry completes; it continued where the trial died
    assert retry.state == TrialState.COMPLETE and 0 in retry.intermediate_values
    assert len([t for t in trials if t.state in FINISHED]) == 3 and len(trials) == 4
    client = tracking(project)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    epochs = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "val_accuracy")]
    assert epochs and min(epochs) >= 1, epochs  # the retry resumed from the dead trial's checkpoint


def test_the_tuning_flow_runs_on_prefect(project: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.tuning import tuning_flow

    with prefect_test_harness(server_startup_timeout=120):
        state = tuning_flow(root=str(project), overrides={"tune.trials": 1}, return_state=True)
        assert state.is_completed(), state.message
        report = state.result()
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tuning-best"]))
            )
    assert report["counts"]["complete"] == 1
    assert json.loads((project / "reports/tune.json").read_text()) == report
    assert found and "val_accuracy" in found[0].data
