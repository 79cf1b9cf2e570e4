"""A trained, exported project and the real service (`python -m serving`) in a child process.

    project = build_project(tmp / "project")          # 3 digit classes, small CNN, SavedModel
    version = register(project, "champion")           # a registry version whose run has the SavedModel
    with running_service(project.params, "--poll-seconds", "1") as service:
        service.predict([png_bytes])                   # TF Serving REST, row format

The project trains the small CNN for a few epochs on 3 x 40 digits (32x32) and
writes the SavedModel with the export stage's own function, so every serving
test runs the same bytes-in graph `make run` exports. Versions are registered
with the registry module the register stage uses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import FAST_RECIPE, NO_AUGMENT, REPO_ROOT, digit_images, merge, write_tree
from tests.servers import ServerProcess, free_port, venv_env

OVERRIDES: dict[str, Any] = {
    "validate": {"min_images_per_class": 5},
    "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "train": {
        "image_size": 32,
        "batch_size": 8,
        "epochs": 8,
        **FAST_RECIPE,
        "augment": NO_AUGMENT,
    },
    "evaluate": {"latency_images": 5},
    "serve": {"poll_seconds": 1, "warmup_requests": 1},
}


@dataclass(frozen=True)
class ServingProject:
    """A project root with params.yaml, a trained model, its evaluation and its SavedModel."""

    root: Path
    cfg: Any
    paths: Any

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def test_files(self) -> list[Path]:
        from pipeline.artifacts import image_files, read_split

        return image_files(read_split(self.paths, "test"), self.root)


def write_params(root: Path, *extra: dict[str, Any], name: str = "params.yaml") -> Path:
    """The repo's params.yaml with OVERRIDES and `extra` merged in, written to root/<name>.

    A service started with `--params root/<name>` uses root's MLflow store whatever the name.
    """
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    merge(raw, yaml.safe_load(yaml.safe_dump(OVERRIDES)))
    for part in extra:
        merge(raw, yaml.safe_load(yaml.safe_dump(part)))
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / name


def build_project(
    root: Path, classes: int = 3, per_class: int = 40, extra: tuple[dict[str, Any], ...] = ()
) -> ServingProject:
    """Ingest, validate, split, train, evaluate and export (SavedModel only) a small digits project."""
    from pipeline import evaluate, ingest, split, train, validate
    from pipeline.artifacts import input_size, load_trained_model
    from pipeline.config import load_config
    from pipeline.export import export_savedmodel
    from pipeline.paths import StagePaths

    source = write_tree(root.parent / f"{root.name}-images", digit_images(per_class, classes, scale=4))
    params = write_params(root, {"ingest": {"source": "folder", "folder": {"path": str(source)}}}, *extra)
    cfg = load_config(params)
    paths = StagePaths.from_config(cfg.paths, root)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        for stage in (ingest, validate, split, train, evaluate):
            stage.run(cfg, paths)
        model, names = load_trained_model(paths)
        export_savedmodel(model, names, input_size(model), paths.savedmodel)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return ServingProject(root, cfg, paths)


def register(
    project: ServingProject, alias: str | None, savedmodel: Path | None = None, name: str | None = None
) -> str:
    """Register the project's model as a new version (in a new run holding `savedmodel`), set `alias`."""
    import mlflow

    from pipeline import registry, tracking
    from pipeline.artifacts import load_trained_model

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        experiment = tracking.configure(project.cfg.mlflow, project.root)
        name = name or project.cfg.mlflow.registered_model
        with mlflow.start_run(experiment_id=experiment):
            mlflow.log_artifacts(str(savedmodel or project.paths.savedmodel), registry.SAVEDMODEL_ARTIFACT)
            version = registry.log_and_register(load_trained_model(project.paths)[0], name)
        if alias is not None:
            registry.set_alias(name, alias, version)
        return version
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def set_alias(project: ServingProject, alias: str, version: str, name: str | None = None) -> None:
    """Move `alias` of the project's registered model to `version` (as promotion and rollback do)."""
    import mlflow

    from pipeline import tracking

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        tracking.configure(project.cfg.mlflow, project.root)
        model = name or project.cfg.mlflow.registered_model
        mlflow.MlflowClient().set_registered_model_alias(model, alias, version)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@dataclass
class Service:
    """A running `python -m serving` and a client for it."""

    url: str
    process: ServerProcess
    model: str

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def predict(self, images: list[bytes], path: str | None = None, **request: Any) -> httpx.Response:
        """POST a row-format predict request (to the stable label unless `path` says otherwise)."""
        with self.client() as client:
            body = {"instances": [b64(image) for image in images], **request}
            return client.post(path or f"/v1/models/{self.model}:predict", json=body)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {'name{labels}': value}."""
        with self.client() as client:
            text = client.get("/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for /v2/health/ready to answer 200; returns its body."""
        deadline = time.monotonic() + timeout
        answer: Any = None
        while time.monotonic() < deadline:
            try:
                with self.client(5.0) as client:
                    answer = client.get("/v2/health/ready")
                if answer.status_code == 200:
                    return dict(answer.json())
            except httpx.TransportError:
                pass
            if self.process.popen.poll() is not None:
                raise AssertionError(f"the service exited:\n{self.process.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout:.0f} s: {answer and answer.text}\n{self.process.tail()}")


@contextmanager
def running_service(
    params: Path, *args: str, model: str = "image-classifier", env: dict[str, str] | None = None
) -> Iterator[Service]:
    """`python -m serving --params params --port <free> *args`, live (not necessarily ready) on yield."""
    port = free_port()
    log = params.parent / f"serving-{port}.log"
    environment = venv_env({"PYTHONUNBUFFERED": "1", **(env or {})})
    if "MLFLOW_TRACKING_URI" not in (env or {}):  # the project's own SQLite store
        environment.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", "serving", "--params", str(params), "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = ServerProcess("serving", popen, log)
    service = Service(f"http://127.0.0.1:{port}", process, model)
    try:
        process.wait_until(lambda: _live(service), timeout=120)
        yield service
    finally:
        process.stop()


def _live(service: Service) -> bool:
    try:
        with service.client(2.0) as client:
            return client.get("/v2/health/live").status_code == 200
    except httpx.TransportError:
        return False


def evaluate_predictions(project: ServingProject) -> tuple[list[str], Any]:
    """The evaluate stage's predicted classes and probabilities on the test split, in split order."""
    from pipeline import evaluate

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        _, names, _, _, _, probabilities = evaluate.score_test_split(project.cfg, project.paths)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return [names[i] for i in probabilities.argmax(axis=1)], probabilities


def dump(value: Any) -> str:
    return json.dumps(value)[:500]
