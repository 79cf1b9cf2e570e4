"""The model service over a real registry: TF Serving's REST API, uploads, batching, metrics, hot swaps.

One small digits project is trained and exported per module; its model is
registered in the project's MLflow store and served by `python -m serving`,
started as a child process on a free port, exactly as `make serve` starts it.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.serving_support import (
    ServingProject,
    b64,
    evaluate_predictions,
    register,
    running_service,
    set_alias,
    write_params,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MAX_PIXELS = 100_000  # ingest.max_pixels of this project: a 400x400 image is over it
SERVE = {
    "batch_timeout_ms": 25,
    "max_batch_size": 32,
    "max_body_mb": 1,
    "poll_seconds": 0.5,
    "max_request_pixels": 150_000,  # two 300x300 images (90,000 pixels each, under MAX_PIXELS) are over it
}


@pytest.fixture(scope="module")
def project(serving_project: ServingProject) -> ServingProject:
    return serving_project


@pytest.fixture(scope="module")
def service(project: ServingProject):
    folder = {"source": "folder", "folder": {"path": str(project.root)}}
    limits = {"ingest": {**folder, "max_pixels": MAX_PIXELS}, "serve": SERVE}
    with running_service(write_params(project.root, limits, name="params-small-limits.yaml")) as running:
        running.wait_ready()
        yield running


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def counter(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def test_the_services_predictions_on_the_test_split_are_the_evaluate_stages(project, service):
    files = project.test_files()
    expected_classes, expected = evaluate_predictions(project)
    images = [f.read_bytes() for f in files]

    rows = service.predict(images)
    assert rows.status_code == 200, rows.text
    assert rows.headers["X-Model-Version"] == "1"
    predictions = rows.json()["predictions"]
    assert [p["predicted_class"] for p in predictions] == expected_classes
    assert np.abs(np.array([p["probabilities"] for p in predictions]) - expected).max() < 1e-5
    assert predictions[0]["class_names"] == ["0", "1", "2"]

    with service.client() as client:  # columnar, named input, several formats and modes of one image
        columnar = client.post(
            "/v1/models/image-classifier/versions/1:predict",
            json={"signature_name": "serving_default", "inputs": {"image_bytes": [b64(i) for i in images]}},
        )
    assert columnar.status_code == 200, columnar.text
    outputs = columnar.json()["outputs"]
    assert outputs["predicted_class"] == expected_classes
    assert np.abs(np.array(outputs["probabilities"]) - expected).max() < 1e-5

    first = Image.open(files[0])
    variants = []
    for fmt, mode in [("JPEG", "L"), ("BMP", "RGB"), ("GIF", "P"), ("WEBP", "RGBA"), ("PNG", "LA")]:
        buffer = io.BytesIO()
        first.convert(mode).resize((97, 61)).save(buffer, format=fmt)
        variants.append(buffer.getvalue())
    answer = service.predict(variants)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 5


def test_status_metadata_health_and_the_labels(service):
    with service.client() as client:
        status = client.get("/v1/models/image-classifier").json()
        assert status["model_version_status"] == [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
        signature = client.get("/v1/models/image-classifier/metadata").json()["metadata"]["signature_def"]
        default = signature["signature_def"]["serving_default"]
        assert default["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
        assert set(default["outputs"]) == {"probabilities", "predicted_class", "class_names"}
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").json()["ready"] is True
        assert client.get("/v2/models/image-classifier/ready").status_code == 200
        assert client.get("/v2/models/other/ready").status_code == 404
        stable = client.post(
            "/v1/models/image-classifier/labels/stable:predict", json={"instances": [b64(png(8, 8))]}
        )
        assert stable.status_code == 200 and stable.headers["X-Model-Version"] == "1"


def test_every_refusal_has_its_status_and_names_the_problem(project, service):
    good = project.test_files()[0].read_bytes()
    predict = "/v1/models/image-classifier:predict"
    cases = [
        (predict, b"{not json", 400, "not JSON"),
        (predict, b"", 400, "empty"),
        (predict, json.dumps({"instances": [b64(good), {"b64": "***"}]}).encode(), 400, "instance 1"),
        (predict, json.dumps({"instances": [b64(b"<html>hello</html>")]}).encode(), 400, "not an image"),
        (predict, json.dumps({"instances": [b64(good[: len(good) // 2])]}).encode(), 400, "truncated"),
        (predict, json.dumps({"instances": [b64(png(400, 400))]}).encode(), 400, "max_pixels"),
        (predict, json.dumps({"instances": [b64(png(300, 300))] * 2}).encode(), 400, "max_request_pixels"),
        (predict, json.dumps({"instances": []}).encode(), 400, "non-empty"),
        (predict, json.dumps({"instances": [b64(good)] * 300}).encode(), 400, "max_instances"),
        ("/v1/models/other:predict", json.dumps({"instances": [b64(good)]}).encode(), 404, "unknown model"),
        ("/v1/models/image-classifier/versions/9:predict", b"{}", 404, "version 9"),
        ("/v1/models/image-classifier/labels/canary:predict", b"{}", 404, "challenger"),
        ("/v1/models/image-classifier/labels/beta:predict", b"{}", 404, "unknown label"),
        (predict, json.dumps({"instances": [{"b64": "A" * 1_500_000}]}).encode(), 413, "max_body_mb"),
    ]
    with service.client() as client:
        for path, body, status, words in cases:
            answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == status, (path, body[:60], answer.text)
            assert words in answer.json()["error"], (words, answer.json())


def test_an_upload_returns_the_top_k_classes_of_each_file_with_the_version_and_latency(project, service):
    files = project.test_files()[:2]
    expected_classes, _ = evaluate_predictions(project)
    with service.client() as client:
        answer = client.post(
            "/predict?top_k=2", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files]
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == "1" and body["label"] == "stable" and body["latency_ms"] > 0
        assert [p["file"] for p in body["predictions"]] == [f.name for f in files]
        assert [p["predicted_class"] for p in body["predictions"]] == expected_classes[:2]
        for prediction in body["predictions"]:
            probabilities = [entry["probability"] for entry in prediction["top_k"]]
            assert len(probabilities) == 2 and probabilities == sorted(probabilities, reverse=True)
            assert prediction["top_k"][0]["class"] == prediction["predicted_class"]

        text = client.post("/predict", files=[("file", ("notes.txt", b"just text", "text/plain"))])
        assert text.status_code == 400 and "notes.txt" in text.json()["error"]
        page = client.get("/")
        assert page.status_code == 200 and "image-classifier" in page.text and 'type="file"' in page.text


def test_concurrent_requests_share_model_calls_and_the_metrics_count_the_traffic(project, service):
    files = project.test_files()
    expected_classes, _ = evaluate_predictions(project)
    before = service.metrics()
    requests = 48

    def one(index: int) -> tuple[int, str, str]:
        answer = service.predict([files[index % len(files)].read_bytes()])
        return (
            answer.status_code,
            answer.json()["predictions"][0]["predicted_class"],
            answer.headers["X-Model-Version"],
        )

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(one, range(requests)))
    bad = [service.predict([b"not an image"]) for _ in range(3)]
    after = service.metrics()

    assert all(status == 200 for status, _, _ in answers)
    assert [cls for _, cls, _ in answers] == [expected_classes[i % len(files)] for i in range(requests)]
    assert all(b.status_code == 400 for b in bad)

    def delta(name: str, **labels: str) -> float:
        return counter(after, name, **labels) - counter(before, name, **labels)

    calls = delta("serving_model_calls_total", model_version="1")
    endpoint = "/v1/models/{name}:predict"
    assert delta("serving_requests_total", endpoint=endpoint, status="200", model_version="1") == requests
    assert delta("serving_requests_total", endpoint=endpoint, status="400") == 3
    assert 1 <= calls < requests, f"{requests} requests ran in {calls} model calls: not batched"
    assert delta("serving_batch_size_images_count", model_version="1") == calls
    assert delta("serving_batch_size_images_sum", model_version="1") == requests
    assert delta("serving_batch_size_requests_count", model_version="1") == calls  # one image a request
    assert delta("serving_batch_size_requests_sum", model_version="1") == requests
    assert delta("serving_model_call_duration_seconds_count", model_version="1") == calls
    assert delta("serving_model_call_duration_seconds_sum", model_version="1") > 0
    assert delta("serving_images_total", model_version="1") == requests
    per_class = Counter(cls for _, cls, _ in answers)
    for name, count in per_class.items():
        assert delta("serving_predicted_class_total", model_version="1", class_name=name) == count
    assert delta("serving_request_duration_seconds_count", endpoint=endpoint) == requests + 3
    assert delta("serving_request_duration_seconds_bucket", endpoint=endpoint, le="+Inf") == requests + 3
    assert delta("serving_request_duration_seconds_sum", endpoint=endpoint) > 0
    assert counter(after, "serving_model_loads_total", model_version="1") == 1
    assert counter(after, "serving_requests_in_flight") == 1  # the scrape itself


def test_with_no_champion_it_waits_then_swaps_versions_under_load_without_a_failed_request(project, tmp_path):
    name = "hot-swap"
    broken = tmp_path / "broken"
    shutil.copytree(project.paths.savedmodel, broken)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    image = project.test_files()[0].read_bytes()
    with running_service(project.params, "--model-name", name, model=name) as service:
        with service.client() as client:
            deadline = time.monotonic() + 30  # until its first look at the registry has answered
            while "make run" not in (ready := client.get("/v2/health/ready")).text:
                assert ready.status_code == 503 and time.monotonic() < deadline, ready.text
                time.sleep(0.2)
            assert ready.status_code == 503, ready.text
            refused = client.post(f"/v1/models/{name}:predict", json={"instances": [b64(image)]})
            assert refused.status_code == 503 and "make run" in refused.json()["error"]

        first = register(project, "champion", name=name)
        service.wait_ready(timeout=60)

        seen: list[str] = []  # versions in the order responses arrived, all streams together
        streams: list[list[str]] = [[] for _ in range(4)]  # each stream's own, in its order
        failures: list[str] = []
        stop = threading.Event()

        def stream(mine: list[str]) -> None:
            with service.client() as client:
                while not stop.is_set():
                    try:
                        answer = client.post(f"/v1/models/{name}:predict", json={"instances": [b64(image)]})
                    except httpx.HTTPError as error:  # a refused or dropped connection is a failure too
                        failures.append(repr(error))
                        continue
                    if answer.status_code != 200:
                        failures.append(answer.text)
                    else:
                        mine.append(answer.headers["X-Model-Version"])
                        seen.append(mine[-1])

        def wait_for(version: str, timeout: float = 120.0) -> None:
            deadline = time.monotonic() + timeout
            while not (seen and seen[-1] == version):
                assert time.monotonic() < deadline, (
                    f"responses never came from version {version}: {seen[-5:]}"
                )
                time.sleep(0.1)

        workers = [threading.Thread(target=stream, args=(mine,)) for mine in streams]
        for worker in workers:
            worker.start()
        try:
            wait_for(first)
            second = register(project, "champion", name=name)  # promotion
            wait_for(second)
            set_alias(project, "champion", first, name=name)  # rollback
            wait_for(first)
            third = register(project, "champion", savedmodel=broken, name=name)  # fails to load
            time.sleep(3.0)  # several polls
            assert seen[-1] == first
        finally:
            stop.set()
            for worker in workers:
                worker.join()

        assert failures == []
        # Each stream sends one request at a time, so its own responses show the swaps in order (across
        # streams, a request that took the old version just before a swap may finish after a new one).
        for mine in streams:
            order = [v for i, v in enumerate(mine) if i == 0 or mine[i - 1] != v]
            assert order == [first, second, first], order
        with service.client() as client:
            states = {
                s["version"]: s for s in client.get(f"/v1/models/{name}").json()["model_version_status"]
            }
        assert states[first]["state"] == "AVAILABLE"
        assert states[second]["state"] == "END"
        assert states[third]["state"] == "UNAVAILABLE" and states[third]["status"]["error_message"]
        samples = service.metrics()
        assert counter(samples, "serving_model_load_failures_total", model_version=third) == 1
        assert counter(samples, "serving_model_loads_total", model_version=first) == 2  # loaded again
        assert counter(samples, "serving_model_version_loaded", model_version=first, label="stable") == 1


def test_the_canary_label_serves_the_challenger(project):
    name = "canary-model"
    stable = register(project, "champion", name=name)
    canary = register(project, "challenger", name=name)
    image = project.test_files()[0].read_bytes()
    with running_service(project.params, "--model-name", name, model=name) as service:
        service.wait_ready()
        deadline = time.monotonic() + 30
        while True:
            answer = service.predict([image], path=f"/v1/models/{name}/labels/canary:predict")
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == canary
        assert service.predict([image]).headers["X-Model-Version"] == stable
        by_version = service.predict([image], path=f"/v1/models/{name}/versions/{canary}:predict")
        assert by_version.headers["X-Model-Version"] == canary


def test_bodies_are_json_over_http_not_only_from_this_client(service):
    """A client written for TF Serving (plain JSON over urllib, no httpx) gets the same answer."""
    import urllib.request

    body = json.dumps({"instances": [{"b64": base64.b64encode(png(20, 20)).decode()}]}).encode()
    request = urllib.request.Request(
        f"{service.url}/v1/models/image-classifier:predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        assert set(json.loads(answer.read())["predictions"][0]) == {
            "probabilities",
            "predicted_class",
            "class_names",
        }


def test_the_gate_serves_the_candidate_before_promotion_and_a_broken_one_stays_challenger(project, tmp_path):
    from pipeline import gate
    from pipeline import register as register_stage
    from pipeline.artifacts import write_report
    from pipeline.errors import GateFailed
    from pipeline.paths import StagePaths

    root = tmp_path / "project"
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns("serving-*.log"))
    cfg = project.cfg.model_copy(
        update={
            "gate": project.cfg.gate.model_copy(update={"min_accuracy": 0.0, "min_macro_f1": 0.0}),
            "mlflow": project.cfg.mlflow.model_copy(update={"registered_model": "smoke-test"}),
        }
    )
    paths = StagePaths.from_config(cfg.paths, root)
    write_report({"accuracy": 0.0}, paths.baseline_report)
    write_report({"keras": {"accuracy": 1.0}, "tflite": {"int8": {"accuracy": 1.0}}}, paths.export_report)

    served = {c.name: c for c in gate.run(cfg, paths).checks}["serving_smoke_test"]
    assert served.status == "passed" and served.value == 1.0, served
    count = len(project.test_files())
    assert f"{count}/{count} test images" in served.detail

    # A candidate that loads but answers otherwise than evaluate measured (here evaluate's record of
    # rows 0 and 1 names another class) fails too, naming the rows.
    evaluated = paths.predictions.read_text()
    predictions = pd.read_csv(paths.predictions, dtype=str, keep_default_na=False)
    names = sorted(set(predictions["actual"]))
    for row in (0, 1):
        predictions.loc[row, "predicted"] = next(n for n in names if n != predictions.loc[row, "predicted"])
    predictions.to_csv(paths.predictions, index=False)
    differing = {c.name: c for c in gate.run(cfg, paths).checks}["serving_smoke_test"]
    assert differing.status == "failed" and differing.value == pytest.approx((count - 2) / count), differing
    assert "differing rows: [0, 1]" in differing.detail, differing
    paths.predictions.write_text(evaluated)

    (paths.savedmodel / "saved_model.pb").write_bytes(b"\x00broken")
    verdict = gate.run(cfg, paths)
    assert not verdict.passed
    report = json.loads(paths.gate_report.read_text())
    check = report["checks"]["serving_smoke_test"]
    assert check["status"] == "failed" and check["value"] is None
    assert "could not be served" in check["detail"] and "saved_model" in check["detail"].lower(), check
    with pytest.raises(GateFailed, match="serving_smoke_test"):
        register_stage.run(cfg, paths)
    assert json.loads(paths.register_report.read_text())["alias"] == "challenger"
