"""The gate fails closed, against a real MLflow server: registry errors, class changes, a moved champion.

The server is the project's (mlflow/start-server.sh) behind a real HTTP proxy
on 127.0.0.1 that forwards everything and, when told, answers the registry's
alias lookups with a 500, as an overloaded or half-broken tracking server does
(its /health still answers). Models are tiny Keras networks on 8x8 images, so
the tests exercise the gate and register stages, not training.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import keras
import mlflow
import pandas as pd
import pytest

from pipeline import gate, register, registry, tracking
from pipeline.artifacts import write_class_names, write_report
from pipeline.errors import RegistryError, StaleGate
from tests.conftest import digit_images, merge, write_tree
from tests.servers import mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "fails-closed"


class FaultyMlflowProxy:
    """Forward to `upstream`; while `broken`, answer registry alias lookups with HTTP 500."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.broken = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.broken and "/registered-models/alias" in self.path:
                    payload = b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def serving(self) -> Iterator[FaultyMlflowProxy]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[FaultyMlflowProxy]:
    store = tmp_path_factory.mktemp("mlflow-store")
    server = mlflow_server(f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts"), None)
    with server as running, FaultyMlflowProxy(running.uri).serving() as faulty:
        yield faulty


@pytest.fixture(autouse=True)
def tracking_env(proxy, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a 500 fails now, not after backoff
    proxy.broken = False
    yield
    proxy.broken = False
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        with suppress(mlflow.exceptions.MlflowException):
            mlflow.MlflowClient().delete_registered_model_alias(MODEL, alias)


def tiny_model(classes: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax", name="probabilities")(x))


def candidate(make_config, root: Path, classes: int = 3, extra: dict | None = None):
    """A project whose train/evaluate/export outputs exist: a perfect candidate on 8x8 digits."""
    source = write_tree(root / "images", digit_images(per_class=6, classes=classes, scale=1))
    test = pd.DataFrame(
        [
            {"path": (source / label / image.name).relative_to(root).as_posix(), "label": label}
            for label in sorted(p.name for p in source.iterdir())
            for image in sorted((source / label).iterdir())
        ]
    )
    # The reports here are written by hand, with no exported model to serve: no smoke test.
    overrides = merge(
        {
            "mlflow": {"registered_model": MODEL, "connect_timeout_seconds": 5},
            "gate": {"serving_smoke_test": False},
        },
        extra or {},
    )
    cfg, paths = make_config(overrides, root=root)
    for folder in (paths.splits, paths.reports, paths.keras_model.parent):
        folder.mkdir(parents=True, exist_ok=True)
    test.to_csv(paths.split_file("test"), index=False)
    pd.DataFrame({"actual": test["label"], "predicted": test["label"]}).to_csv(paths.predictions, index=False)
    names = sorted(test["label"].unique())
    write_class_names(names, paths.classes)
    write_report({"accuracy": 1.0, "macro_f1": 1.0}, paths.metrics)
    write_report({"accuracy": 0.5}, paths.baseline_report)
    write_report({"keras": {"accuracy": 1.0}, "tflite": {"int8": {"accuracy": 1.0}}}, paths.export_report)
    tiny_model(len(names), seed=len(names)).save(paths.keras_model)
    experiment = tracking.configure(cfg.mlflow, paths.root)
    with mlflow.start_run(experiment_id=experiment) as run:
        tracking.write_run_file(paths, run)
    return cfg, paths


def make_champion(classes: list[str]) -> str:
    """Register a (weak) tiny model predicting `classes` and make it champion; returns its version."""
    with mlflow.start_run():
        version = registry.log_and_register(tiny_model(len(classes), seed=99), MODEL)
    registry.tag_version(MODEL, version, {"passed": True, "checks": {}}, classes)
    registry.set_alias(MODEL, registry.CHAMPION, version)
    return version


def champion_check(paths: Path) -> dict:
    return json.loads(paths.gate_report.read_text())["checks"]["no_regression_vs_champion"]


def test_a_registry_answering_500_fails_the_gate_instead_of_skipping_the_champion(
    make_config, tmp_path, proxy
):
    cfg, paths = candidate(make_config, tmp_path / "a")
    champion = make_champion(["0", "1", "2"])
    proxy.broken = True
    with pytest.raises(RegistryError, match=rf"gate failed closed.*{proxy.uri}"):
        gate.run(cfg, paths)
    report = json.loads(paths.gate_report.read_text())
    assert report["passed"] is False and report["champion_version"] is None
    check = champion_check(paths)
    assert check["status"] == "failed"
    assert "could not be looked up" in check["detail"] and proxy.uri in check["detail"]
    assert "500" in check["detail"] or "INTERNAL_ERROR" in check["detail"]
    proxy.broken = False
    assert mlflow.MlflowClient().get_model_version_by_alias(MODEL, "champion").version == champion


def test_a_missing_alias_is_no_champion_and_is_skipped(make_config, tmp_path):
    cfg, paths = candidate(make_config, tmp_path / "a")
    assert gate.run(cfg, paths).passed
    assert champion_check(paths)["status"] == "skipped"
    assert "first model" in champion_check(paths)["detail"]


def test_a_class_change_blocks_by_default_naming_the_classes(make_config, tmp_path):
    cfg, paths = candidate(make_config, tmp_path / "a", classes=3)
    make_champion(["0", "1", "7"])
    assert not gate.run(cfg, paths).passed
    check = champion_check(paths)
    assert check["status"] == "failed"
    assert "added ['2']" in check["detail"] and "removed ['7']" in check["detail"]
    assert "on_class_change" in check["detail"]


def test_a_class_change_can_be_allowed_and_shows_as_skipped(make_config, tmp_path):
    cfg, paths = candidate(make_config, tmp_path / "a", extra={"gate": {"on_class_change": "allow"}})
    make_champion(["0", "1", "7"])
    assert gate.run(cfg, paths).passed
    assert champion_check(paths)["status"] == "skipped"
    assert "on_class_change: allow" in champion_check(paths)["detail"]


def test_compare_common_scores_both_on_the_shared_classes_only(make_config, tmp_path):
    cfg, paths = candidate(make_config, tmp_path / "a", extra={"gate": {"on_class_change": "compare_common"}})
    make_champion(["0", "1", "7"])
    assert gate.run(cfg, paths).passed  # the perfect candidate beats the random champion
    check = champion_check(paths)
    assert check["status"] == "passed"
    assert "the 12 test images of the shared classes" in check["detail"]  # classes 0 and 1, 6 each
    assert check["value"] > 0


def test_only_the_first_of_two_candidates_gated_against_one_champion_is_promoted(make_config, tmp_path):
    first_cfg, first = candidate(make_config, tmp_path / "first")
    second_cfg, second = candidate(make_config, tmp_path / "second")
    champion = make_champion(["0", "1", "2"])
    assert gate.run(first_cfg, first).passed and gate.run(second_cfg, second).passed
    for paths in (first, second):
        assert json.loads(paths.gate_report.read_text())["champion_version"] == champion
    promoted = register.run(first_cfg, first)
    assert promoted.alias == "champion"
    with pytest.raises(StaleGate, match=rf"against champion version {champion}, but the champion is version"):
        register.run(second_cfg, second)
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(MODEL, "champion").version == promoted.version
    refused = json.loads(second.register_report.read_text())
    assert refused["alias"] == "challenger"
    assert client.get_model_version_by_alias(MODEL, "challenger").version == refused["version"]
