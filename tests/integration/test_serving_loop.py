"""The serving loop over the real service: prediction log, feedback, live quality, shadow scoring, batches.

Every scenario starts `python -m serving` as a child process on its own
params file (written into the shared project's root, with its own
`serve.log_dir` and `drift.landing` in a temporary folder) and serves
`loop-classifier`: the project's model as `champion`, with the drift
reference the live figures compare with, and as `challenger` the same model
with its outputs for classes 0 and 1 swapped, so the challenger's answer to
every image is known in advance (SWAPPED) and differs from the champion's.
What the tests check is read back from the log files themselves, the
landing area and the HTTP answers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image

from tests.servers import moto_s3
from tests.serving_support import Service, ServingProject, b64, register, running_service, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "loop-classifier"
CLASSES = ["0", "1", "2"]
SWAPPED = {"0": "1", "1": "0", "2": "2"}  # the challenger's answer, given the champion's
BUCKET = "loop"

T = TypeVar("T")
Key = tuple[str, int]


# -- the registered versions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """`loop-classifier` in the shared project's registry: its champion and challenger versions."""

    project: ServingProject
    champion: str
    challenger: str
    test_accuracy: float  # the evaluate stage's, in reports/metrics.json
    training_share: dict[str, float]  # class shares of the labels the drift reference holds


def _in_project_store(project: ServingProject, action: Callable[[], T]) -> T:
    """Run `action` against the project's own MLflow store (the environment's URI set aside)."""
    from pipeline import tracking

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        tracking.configure(project.cfg.mlflow, project.root)
        return action()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def models(serving_project: ServingProject, tmp_path_factory: pytest.TempPathFactory) -> Models:
    import mlflow

    from pipeline import registry
    from pipeline.artifacts import image_files, input_size, load_trained_model, read_split
    from pipeline.export import export_savedmodel
    from pipeline.monitoring.profile import build_reference

    project = serving_project
    scratch = tmp_path_factory.mktemp("loop-models")
    metrics = json.loads(project.paths.metrics.read_text())
    model, names = load_trained_model(project.paths)
    assert names == CLASSES
    val = read_split(project.paths, "val")
    reference = build_reference(
        image_files(val, project.root),
        list(val["label"]),
        model,
        names,
        input_size(model),
        project.cfg.drift.embeddings.dim,
        float(metrics["accuracy"]),
        int(metrics["test_images"]),
    )
    reference.save(scratch / "reference")

    probabilities = model.get_layer("probabilities")
    kernel, bias = probabilities.get_weights()
    probabilities.set_weights([kernel[:, [1, 0, 2]], bias[[1, 0, 2]]])
    export_savedmodel(model, names, input_size(model), scratch / "swapped")

    champion = register(project, "champion", name=MODEL)
    run_id = _in_project_store(project, lambda: registry.version(MODEL, champion).run_id)
    _in_project_store(
        project,
        lambda: mlflow.MlflowClient().log_artifacts(
            run_id, str(scratch / "reference"), registry.REFERENCE_ARTIFACT
        ),
    )
    challenger = register(project, "challenger", scratch / "swapped", name=MODEL)
    counts = Counter(val["label"])
    share = {name: count / len(val) for name, count in sorted(counts.items())}
    return Models(project, champion, challenger, float(metrics["accuracy"]), share)


# -- services ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    """A params file of the shared project with its own prediction log and landing area."""

    params: Path
    log_dir: Path
    landing: Path


def loop_params(
    project: ServingProject, folder: Path, tag: str, *extra: dict[str, Any], **serve: Any
) -> Loop:
    log_dir, landing = folder / "served", folder / "landing"
    settings = {
        "serve": {"log_dir": str(log_dir), "shadow_fraction": 0.0, **serve},
        "drift": {"landing": str(landing)},
    }
    params = write_params(project.root, settings, *extra, name=f"params-loop-{tag}.yaml")
    return Loop(params, log_dir, landing)


@contextmanager
def serving(loop: Loop, env: dict[str, str] | None = None) -> Iterator[Service]:
    """The service on `loop`'s params, ready, with the challenger loaded as `canary`."""
    with running_service(loop.params, "--model-name", MODEL, model=MODEL, env=env) as service:
        service.wait_ready()
        with service.client() as client:
            eventually(
                lambda: client.get(f"/v1/models/{MODEL}/labels/canary").status_code == 200,
                f"the challenger serving as canary\n{service.process.tail()}",
            )
        yield service


# -- what the client sent and got ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One image of one answered request."""

    id: str
    index: int
    data: bytes
    version: str
    predicted: str
    probabilities: dict[str, float]

    @property
    def key(self) -> Key:
        return (self.id, self.index)

    @property
    def confidence(self) -> float:
        return max(self.probabilities.values())


def _request_id(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]
    assert isinstance(request_id, str) and request_id
    assert answer.headers["X-Request-Id"] == request_id
    return request_id


def predict_rows(service: Service, images: list[bytes], label: str | None = None) -> list[Answer]:
    """TF Serving's row format, to `stable` (or to `label`)."""
    path = f"/v1/models/{MODEL}/labels/{label}:predict" if label else None
    answer = service.predict(images, path=path)
    request_id, version = _request_id(answer), answer.headers["X-Model-Version"]
    return [
        Answer(
            request_id,
            i,
            data,
            version,
            p["predicted_class"],
            dict(zip(p["class_names"], p["probabilities"], strict=True)),
        )
        for i, (data, p) in enumerate(zip(images, answer.json()["predictions"], strict=True))
    ]


def predict_columns(service: Service, images: list[bytes]) -> list[Answer]:
    """TF Serving's columnar format with the named input."""
    with service.client() as client:
        answer = client.post(
            f"/v1/models/{MODEL}:predict", json={"inputs": {"image_bytes": [b64(i) for i in images]}}
        )
    request_id, version = _request_id(answer), answer.headers["X-Model-Version"]
    outputs = answer.json()["outputs"]
    return [
        Answer(
            request_id,
            i,
            data,
            version,
            outputs["predicted_class"][i],
            dict(zip(outputs["class_names"][i], outputs["probabilities"][i], strict=True)),
        )
        for i, data in enumerate(images)
    ]


def upload(service: Service, files: list[tuple[str, bytes, str]]) -> list[Answer]:
    """`POST /predict` with every class in top_k (so each answer has all probabilities)."""
    with service.client() as client:
        answer = client.post(f"/predict?top_k={len(CLASSES)}", files=[("file", f) for f in files])
    request_id = _request_id(answer)
    body = answer.json()
    assert answer.headers["X-Model-Version"] == body["model_version"]
    return [
        Answer(
            request_id,
            p["index"],
            data,
            body["model_version"],
            p["predicted_class"],
            {entry["class"]: entry["probability"] for entry in p["top_k"]},
        )
        for (_, data, _), p in zip(files, body["predictions"], strict=True)
    ]


def feedback(service: Service, body: Any) -> httpx.Response:
    with service.client() as client:
        return client.post("/v1/feedback", json=body)


def monitoring(service: Service) -> dict[str, Any]:
    with service.client() as client:
        answer = client.get(f"/v1/models/{MODEL}/monitoring")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def distinct_images(project: ServingProject, count: int, offset: int = 0) -> list[tuple[bytes, str]]:
    """`count` test-split images with their labels, all different bytes (past the split: a pixel changed)."""
    from pipeline.artifacts import read_split

    split = read_split(project.paths, "test")
    originals = [
        ((project.root / p).read_bytes(), label)
        for p, label in zip(split["path"], split["label"], strict=True)
    ]
    images = []
    for position in range(offset, offset + count):
        data, label = originals[position % len(originals)]
        round_ = position // len(originals)
        if round_:
            image = Image.open(io.BytesIO(data))
            image.load()
            bands = len(image.getbands())
            image.putpixel((0, 0), round_ if bands == 1 else (round_,) * bands)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        images.append((data, label))
    assert len({hashlib.sha256(d).digest() for d, _ in images}) == count
    return images


def jpeg(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((45, 37)).save(buffer, format="JPEG")
    return buffer.getvalue()


# -- what the service wrote ----------------------------------------------------------------------


def read_log(log_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete line of every log file, oldest file first, and how many files end in a torn line.

    Read here, not with the backend's reader: every complete line must be whole JSON.
    """
    records, torn = [], 0
    for path in sorted((log_dir / "log").glob("*.jsonl")):
        *lines, rest = path.read_bytes().split(b"\n")
        torn += bool(rest)
        records.extend(json.loads(line) for line in lines)
    return records, torn


def logged(log_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [record for record in read_log(log_dir)[0] if record["kind"] == kind]


def eventually(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """`check()`'s first truthy value, polled; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def cuts(log_dir: Path, labelled: bool, count: int) -> list[dict[str, Any]] | None:
    """The `cut` records of labelled (or unlabelled) batches, once there are `count` of them."""
    found = [r for r in logged(log_dir, "cut") if r["labelled"] == labelled]
    return found if len(found) >= count else None


def image_info(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as image:
        return {"width": image.width, "height": image.height, "bytes": len(data), "format": image.format}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_record(record: dict[str, Any], answer: Answer, endpoint: str, log_dir: Path) -> None:
    """A prediction record is the answer the client got, for the bytes it sent, stored as sent."""
    where = f"{answer.key}: {json.dumps(record)[:300]}"
    assert record["kind"] == "prediction" and record["time"], where
    assert (record["id"], record["index"]) == answer.key, where
    assert (record["model"], record["version"], record["label"]) == (MODEL, answer.version, "stable"), where
    assert record["endpoint"] == endpoint, where
    assert record["predicted_class"] == answer.predicted, where
    assert record["probabilities"] == pytest.approx(answer.probabilities, abs=1e-6), where
    assert record["confidence"] == pytest.approx(answer.confidence, abs=1e-6), where
    assert record["latency_ms"] > 0, where
    assert record["sha256"] == sha(answer.data), where
    assert record["image"] == image_info(answer.data), where
    assert record["stored"] and (log_dir / record["stored"]).read_bytes() == answer.data, where


# -- 1, 3: every prediction in the log; feedback -------------------------------------------------


@dataclass(frozen=True)
class Running:
    service: Service
    loop: Loop
    models: Models


@pytest.fixture(scope="class")
def main(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Shadow scoring off, though a challenger serves as canary."""
    loop = loop_params(models.project, tmp_path_factory.mktemp("loop-main"), "main", shadow_fraction=0.0)
    with serving(loop) as service:
        yield Running(service, loop, models)


class TestPredictionLogAndFeedback:
    def test_every_answered_image_is_logged_with_its_answer_and_the_bytes_sent(self, main):
        service, log_dir = main.service, main.loop.log_dir
        images = [data for data, _ in distinct_images(main.models.project, 6)]
        sent = {
            "predict": predict_rows(service, images[:3]) + predict_columns(service, images[3:5]),
            "upload": upload(
                service,
                [("a.png", images[5], "image/png"), ("b.jpg", jpeg(images[0]), "image/jpeg")],
            ),
        }
        assert len({a.id for answers in sent.values() for a in answers}) == 3  # one id per request
        assert all(a.version == main.models.champion for answers in sent.values() for a in answers)

        ids = {a.id for answers in sent.values() for a in answers}
        records = {(r["id"], r["index"]): r for r in logged(log_dir, "prediction") if r["id"] in ids}
        assert sorted(records) == sorted(a.key for answers in sent.values() for a in answers)
        for endpoint, answers in sent.items():
            for answer in answers:
                check_record(records[answer.key], answer, endpoint, log_dir)
        assert records[sent["upload"][1].key]["stored"].endswith(".jpg")

        time.sleep(1.5)  # a shadow answer, if one were wrongly taken, would be written by now
        assert logged(log_dir, "shadow") == []
        report = monitoring(service)
        assert report["served"] == {"stable": main.models.champion, "canary": main.models.challenger}
        assert report["shadow"] == []

    def test_feedback_labels_logged_images_all_or_nothing_and_refuses_what_it_cannot_attach(self, main):
        service, log_dir = main.service, main.loop.log_dir
        images = [data for data, _ in distinct_images(main.models.project, 3, offset=6)]
        answers = predict_rows(service, images)
        request_id = answers[0].id

        first = feedback(service, {"id": request_id, "label": "2"})
        assert first.status_code == 200, first.text
        assert first.json() == {
            "id": request_id,
            "index": 0,
            "label": "2",
            "predicted_class": answers[0].predicted,
            "correct": answers[0].predicted == "2",
            "correction": False,
            "model_version": main.models.champion,
        }

        unknown = feedback(service, {"id": "no-such-request", "label": "0"})
        assert unknown.status_code == 404 and "no-such-request" in unknown.json()["error"], unknown.text
        out_of_range = feedback(service, {"id": request_id, "index": 3, "label": "0"})
        assert out_of_range.status_code == 404 and "image 3" in out_of_range.json()["error"], (
            out_of_range.text
        )
        bad_class = feedback(service, {"id": request_id, "label": "7"})
        assert bad_class.status_code == 400, bad_class.text
        assert "'7'" in bad_class.json()["error"] and "'0', '1', '2'" in bad_class.json()["error"]
        for malformed in ({"label": "0"}, {"id": request_id}, {"id": request_id, "index": -1, "label": "0"}):
            refused = feedback(service, malformed)
            assert refused.status_code == 400 and refused.json()["error"], (malformed, refused.text)
        with service.client() as client:
            not_json = client.post(
                "/v1/feedback", content=b"{label", headers={"Content-Type": "application/json"}
            )
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]

        second = feedback(service, {"id": request_id, "index": 0, "label": "1"})
        assert second.status_code == 200, second.text
        assert second.json()["correction"] is True
        assert second.json()["correct"] == (answers[0].predicted == "1")

        one_unknown = {
            "feedback": [{"id": request_id, "index": 1, "label": "0"}, {"id": "nope", "label": "0"}]
        }
        refused = feedback(service, one_unknown)
        assert refused.status_code == 404 and "feedback item 1" in refused.json()["error"], refused.text
        one_bad_class = {
            "feedback": [
                {"id": request_id, "index": 1, "label": "0"},
                {"id": request_id, "index": 2, "label": "x"},
            ]
        }
        refused = feedback(service, one_bad_class)
        assert refused.status_code == 400 and "feedback item 1" in refused.json()["error"], refused.text
        assert feedback(service, {"feedback": []}).status_code == 400

        both = feedback(
            service,
            {
                "feedback": [
                    {"id": request_id, "index": 1, "label": "0"},
                    {"id": request_id, "index": 2, "label": answers[2].predicted},
                ]
            },
        )
        assert both.status_code == 200, both.text
        assert [(f["index"], f["correct"], f["correction"]) for f in both.json()["feedback"]] == [
            (1, answers[1].predicted == "0", False),
            (2, True, False),
        ]

        records = [r for r in logged(log_dir, "feedback") if r["id"] == request_id]
        assert [(r["index"], r["label"], r["previous"], r["correction"]) for r in records] == [
            (0, "2", None, False),
            (0, "1", "2", True),  # the correction; the refused lists left nothing
            (1, "0", None, False),
            (2, answers[2].predicted, None, False),
        ]
        figures = monitoring(service)["versions"][main.models.champion]
        latest = {0: "1", 1: "0", 2: answers[2].predicted}
        assert figures["labelled"] == 3
        assert figures["accuracy"] == pytest.approx(
            sum(latest[a.index] == a.predicted for a in answers) / 3, abs=1e-6
        )


# -- 2: SIGKILL under load -----------------------------------------------------------------------


def test_a_service_killed_under_load_has_logged_every_answer_it_gave(models, tmp_path):
    loop = loop_params(models.project, tmp_path, "killed", log_fsync_seconds=1.0)
    images = [data for data, _ in distinct_images(models.project, 16)]
    answered: dict[str, list[str]] = {}  # request id -> predicted classes, of every 200 before the kill
    problems: list[str] = []
    stop = threading.Event()

    with serving(loop) as service:

        def send(worker: int) -> None:
            with service.client(10.0) as client:
                turn = worker
                while not stop.is_set():
                    batch = [images[(turn + i) % len(images)] for i in range(1 + turn % 3)]
                    try:
                        answer = client.post(
                            f"/v1/models/{MODEL}:predict", json={"instances": [b64(i) for i in batch]}
                        )
                    except httpx.HTTPError:
                        return  # the service is gone
                    if answer.status_code != 200:
                        problems.append(answer.text)
                        continue
                    body = answer.json()
                    if answer.headers.get("X-Request-Id") != body["request_id"]:
                        problems.append(
                            f"header {answer.headers.get('X-Request-Id')} != {body['request_id']}"
                        )
                    answered[body["request_id"]] = [p["predicted_class"] for p in body["predictions"]]
                    turn += 8

        workers = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for worker in workers:
            worker.start()
        try:
            eventually(lambda: len(answered) >= 150, "150 answered requests", timeout=60)
            os.killpg(service.process.popen.pid, signal.SIGKILL)
            service.process.popen.wait(10)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        killed_with = dict(answered)

    records, torn = read_log(loop.log_dir)
    predictions = {(r["id"], r["index"]): r["predicted_class"] for r in records if r["kind"] == "prediction"}
    missing = [
        (request_id, index)
        for request_id, classes in killed_with.items()
        for index in range(len(classes))
        if (request_id, index) not in predictions
    ]
    print(
        f"\n{len(killed_with)} requests answered before SIGKILL; {len(predictions)} images logged; "
        f"{torn} torn last line(s)"
    )
    assert problems == []
    assert missing == [], f"{len(missing)} answered images are not in the log, e.g. {missing[:3]}"
    assert all(
        predictions[(request_id, index)] == predicted
        for request_id, classes in killed_with.items()
        for index, predicted in enumerate(classes)
    )

    last = next(reversed(killed_with))  # a restarted service takes feedback on what the killed one served
    with serving(loop) as restarted:
        answer = feedback(restarted, {"id": last, "index": 0, "label": "0"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["predicted_class"] == killed_with[last][0]


# -- 4, 5: live quality, shadow scoring ----------------------------------------------------------


@dataclass
class Ledger:
    """Everything sent to one service's `stable` label, its answers, and the labels given."""

    service: Service
    loop: Loop
    models: Models
    answers: dict[Key, Answer] = field(default_factory=dict)
    labels: dict[Key, str] = field(default_factory=dict)

    def predict(self, images: list[bytes]) -> list[Answer]:
        answers = predict_rows(self.service, images)
        self.answers.update((a.key, a) for a in answers)
        return answers

    def upload(self, images: list[bytes]) -> list[Answer]:
        answers = upload(self.service, [(f"{i}.png", data, "image/png") for i, data in enumerate(images)])
        self.answers.update((a.key, a) for a in answers)
        return answers

    def label(self, pairs: list[tuple[Answer, str]]) -> None:
        items = [{"id": a.id, "index": a.index, "label": label} for a, label in pairs]
        answer = feedback(self.service, {"feedback": items})
        assert answer.status_code == 200, answer.text
        self.labels.update((a.key, label) for a, label in pairs)


@pytest.fixture(scope="class")
def shadowed(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """Every `stable` request also scored by the challenger."""
    loop = loop_params(models.project, tmp_path_factory.mktemp("loop-shadow"), "shadow", shadow_fraction=1.0)
    with serving(loop) as service:
        yield Ledger(service, loop, models)


class TestLiveQualityAndShadowScoring:
    def test_live_figures_are_those_of_the_answers_given_and_the_labels_sent(self, shadowed):
        models = shadowed.models
        labelled = distinct_images(models.project, 24)
        answers = []
        for start in range(0, 24, 6):
            answers += shadowed.predict([data for data, _ in labelled[start : start + 6]])
        assert {a.version for a in answers} == {models.champion}
        # true labels, and a wrong one for every fourth image, so accuracy is not the model's own
        shadowed.label(
            [
                (a, label if i % 4 else SWAPPED[label] if label != "2" else "0")
                for i, (a, (_, label)) in enumerate(zip(answers, labelled, strict=True))
            ]
        )
        shadowed.label([(answers[1], "2")])  # a correction replaces the earlier label
        assert shadowed.labels[answers[1].key] == "2"

        expected = shadowed.answers.values()
        labels = shadowed.labels
        accuracy = sum(labels[k] == shadowed.answers[k].predicted for k in labels) / len(labels)
        predicted = Counter(a.predicted for a in expected)
        report = monitoring(shadowed.service)
        figures = report["versions"][models.champion]
        assert figures["label"] == "stable"
        assert figures["images"] == len(shadowed.answers)
        assert figures["labelled"] == len(labels)
        assert figures["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert figures["mean_confidence"] == pytest.approx(
            sum(a.confidence for a in expected) / len(shadowed.answers), abs=1e-4
        )
        assert figures["predicted_class_share"] == pytest.approx(
            {name: count / len(shadowed.answers) for name, count in predicted.items()}, abs=1e-6
        )
        assert figures["reference_test_accuracy"] == pytest.approx(models.test_accuracy, abs=1e-9)
        assert figures["training_class_share"] == pytest.approx(models.training_share, abs=1e-6)

        samples = shadowed.service.metrics()
        version = models.champion
        assert samples[f'serving_live_accuracy{{model_version="{version}"}}'] == pytest.approx(
            accuracy, abs=1e-6
        )
        assert samples[f'serving_live_labelled_images{{model_version="{version}"}}'] == len(labels)
        assert samples[f'serving_live_images{{model_version="{version}"}}'] == len(shadowed.answers)
        assert samples[f'serving_live_reference_test_accuracy{{model_version="{version}"}}'] == pytest.approx(
            models.test_accuracy, abs=1e-6
        )

    def test_the_challenger_scores_stable_requests_in_the_shadow_and_is_compared_on_the_same_images(
        self, shadowed
    ):
        models, log_dir = shadowed.models, shadowed.loop.log_dir
        labelled = distinct_images(models.project, 12, offset=24)
        answers = shadowed.predict([data for data, _ in labelled[:8]])
        answers += shadowed.upload([data for data, _ in labelled[8:]])
        assert {a.version for a in answers} == {models.champion}  # the clients only ever see the champion
        canary = predict_rows(shadowed.service, [data for data, _ in labelled[:8]], label="canary")
        assert [c.predicted for c in canary] == [SWAPPED[a.predicted] for a in answers[:8]]
        assert any(a.predicted != "2" for a in answers), "champion and challenger would agree everywhere"

        def shadow_of_every_answer() -> dict[Key, dict[str, Any]] | None:
            found = {(r["id"], r["index"]): r for r in logged(log_dir, "shadow")}
            return found if set(shadowed.answers) <= set(found) else None

        shadows = eventually(shadow_of_every_answer, "a shadow record for every stable image")
        assert len(shadows) == len(shadowed.answers)  # the canary requests themselves are not shadowed
        for key, answer in shadowed.answers.items():
            record = shadows[key]
            assert record["version"] == models.challenger and record["champion_version"] == models.champion
            assert record["predicted_class"] == SWAPPED[answer.predicted], record
            assert record["agrees"] == (answer.predicted == "2"), record
            swapped = {SWAPPED[name]: p for name, p in answer.probabilities.items()}
            assert record["probabilities"] == pytest.approx(swapped, abs=1e-5), record

        shadowed.label([(a, label) for a, (_, label) in zip(answers, labelled, strict=True)])
        labels = shadowed.labels
        report = monitoring(shadowed.service)
        assert report["shadow"] == [
            {
                "champion_version": models.champion,
                "challenger_version": models.challenger,
                "images": len(shadowed.answers),
                "agreement": pytest.approx(
                    sum(a.predicted == "2" for a in shadowed.answers.values()) / len(shadowed.answers),
                    abs=1e-6,
                ),
                "labelled": len(labels),
                "champion_accuracy": pytest.approx(
                    sum(shadowed.answers[k].predicted == label for k, label in labels.items()) / len(labels),
                    abs=1e-6,
                ),
                "challenger_accuracy": pytest.approx(
                    sum(SWAPPED[shadowed.answers[k].predicted] == label for k, label in labels.items())
                    / len(labels),
                    abs=1e-6,
                ),
            }
        ]
        canary_figures = report["versions"][models.challenger]
        assert canary_figures["label"] == "canary" and canary_figures["images"] == len(canary)


# -- 6: landing batches --------------------------------------------------------------------------


def test_served_and_labelled_images_are_cut_into_whole_landing_batches(models, tmp_path):
    from pipeline.monitoring.landing import read_batch

    loop = loop_params(models.project, tmp_path, "batches", batch_images=5, batch_minutes=60)
    labelled = distinct_images(models.project, 12, offset=36)
    by_sha = {sha(data): data for data, _ in labelled}
    with serving(loop) as service:
        answers: list[Answer] = []
        for start, stop in [(0, 3), (3, 5), (5, 6), (6, 10), (10, 12)]:
            answers += predict_rows(service, [data for data, _ in labelled[start:stop]])

        served_cuts = eventually(lambda: cuts(loop.log_dir, False, 2), "two batches of served images")
        sent = [a.key for a in answers]
        assert [[(i, n) for i, n, _, _ in cut["images"]] for cut in served_cuts] == [sent[:5], sent[5:10]]

        given = [(answers[i], labelled[i][1]) for i in (0, 2, 4, 7, 11)]
        answer = feedback(
            service, {"feedback": [{"id": a.id, "index": a.index, "label": c} for a, c in given]}
        )
        assert answer.status_code == 200, answer.text
        (feedback_cut,) = eventually(lambda: cuts(loop.log_dir, True, 1), "a batch of labelled images")
        time.sleep(1.5)  # a background round more: the two images left over stay until five wait
        records = read_log(loop.log_dir)[0]

    assert [c["batch"] for c in records if c["kind"] == "cut"] == [
        *(c["batch"] for c in served_cuts),
        feedback_cut["batch"],
    ]
    entries = sorted(p.name for p in loop.landing.iterdir())
    assert entries == sorted(c["batch"] for c in [*served_cuts, feedback_cut]), entries  # nothing hidden
    for cut, keys in zip(served_cuts, [sent[:5], sent[5:10]], strict=True):
        folder = loop.landing / cut["batch"]
        assert cut["batch"].startswith("served-") and cut["destination"] == str(folder)
        batch = read_batch(folder)
        assert batch.labels is None and len(batch.files) == 5
        names = {f"{sha(answers[sent.index(k)].data)}.png" for k in keys}
        assert {f.name for f in batch.files} == names
        assert all(f.read_bytes() == by_sha[f.stem] for f in batch.files)
        assert [stored for _, _, label, stored in cut["images"]] == [
            f"images/{name[:2]}/{name}" for name in (f"{sha(answers[sent.index(k)].data)}.png" for k in keys)
        ]

    folder = loop.landing / feedback_cut["batch"]
    assert feedback_cut["batch"].startswith("feedback-") and feedback_cut["destination"] == str(folder)
    assert [(i, n, label) for i, n, label, _ in feedback_cut["images"]] == [
        (a.id, a.index, c) for a, c in given
    ]
    batch = read_batch(folder)
    assert sorted(zip(batch.labels or [], (f.name for f in batch.files), strict=True)) == sorted(
        (c, f"{sha(a.data)}.png") for a, c in given
    )
    assert all(f.read_bytes() == by_sha[f.stem] for f in batch.files)


# -- 7: sampling and storing turned off ----------------------------------------------------------


def test_with_log_sample_zero_nothing_is_logged_and_feedback_has_nowhere_to_go(models, tmp_path):
    loop = loop_params(models.project, tmp_path, "unlogged", log_sample=0.0, batch_images=1)
    image = distinct_images(models.project, 1)[0][0]
    with serving(loop) as service:
        answers = predict_rows(service, [image]) + upload(service, [("a.png", image, "image/png")])
        time.sleep(1.5)  # a background round, had there been a loop
        refused = feedback(service, {"id": answers[0].id, "label": "0"})
        assert refused.status_code == 404 and "log_sample" in refused.json()["error"], refused.text
        with service.client() as client:
            figures = client.get(f"/v1/models/{MODEL}/monitoring")
        assert figures.status_code == 404 and figures.json()["error"], figures.text
    assert not loop.log_dir.exists() or sorted(loop.log_dir.rglob("*")) == []
    assert not loop.landing.exists()


def test_without_stored_images_records_keep_the_hash_and_no_batch_is_cut(models, tmp_path):
    loop = loop_params(models.project, tmp_path, "unstored", store_images=False, batch_images=1)
    images = [data for data, _ in distinct_images(models.project, 2)]
    with serving(loop) as service:
        answers = predict_rows(service, images)
        given = feedback(service, {"id": answers[1].id, "index": 1, "label": "1"})
        assert given.status_code == 200, given.text
        time.sleep(2.5)  # two background rounds: a batch of one would have been cut by now
        records = logged(loop.log_dir, "prediction")
    assert [(r["id"], r["index"]) for r in records] == [a.key for a in answers]
    for record, answer in zip(records, answers, strict=True):
        assert record["sha256"] == sha(answer.data) and record["image"] == image_info(answer.data)
        assert record["stored"] is None
    assert not (loop.log_dir / "images").exists()
    assert logged(loop.log_dir, "cut") == []
    assert not loop.landing.exists() or list(loop.landing.iterdir()) == []


# -- 8: an S3 landing area -----------------------------------------------------------------------


def test_batches_go_to_an_s3_landing_area_and_the_drift_check_pulls_them(models, tmp_path, monkeypatch):
    from pipeline import config, s3
    from pipeline.monitoring import landing

    labelled = distinct_images(models.project, 3, offset=48)
    with moto_s3() as server:
        server.make_bucket(BUCKET)
        loop = loop_params(
            models.project,
            tmp_path,
            "s3",
            {"drift": {"landing_s3": f"s3://{BUCKET}/landing"}, "storage": {"endpoint_url": server.endpoint}},
            batch_images=3,
        )
        with serving(loop, env={**server.env(), config.LANDING_URI_ENV: ""}) as service:
            answers = predict_rows(service, [data for data, _ in labelled])
            answer = feedback(
                service,
                {
                    "feedback": [
                        {"id": a.id, "index": a.index, "label": c}
                        for a, (_, c) in zip(answers, labelled, strict=True)
                    ]
                },
            )
            assert answer.status_code == 200, answer.text
            (served,) = eventually(lambda: cuts(loop.log_dir, False, 1), "a batch of served images")
            (labelled_cut,) = eventually(lambda: cuts(loop.log_dir, True, 1), "a batch of labelled images")
        assert served["destination"] == f"s3://{BUCKET}/landing/{served['batch']}/"
        names = {f"{sha(a.data)}.png": a.data for a in answers}
        objects = {
            o["Key"]: o for o in server.client().list_objects_v2(Bucket=BUCKET, Prefix="landing/")["Contents"]
        }
        assert set(objects) == {f"landing/{served['batch']}/{name}" for name in names} | {
            f"landing/{labelled_cut['batch']}/{label}/{sha(data)}.png" for data, label in labelled
        }
        assert not loop.landing.exists()  # uploaded, not written locally

        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv(config.LANDING_URI_ENV, raising=False)
        cfg = config.load_config(loop.params)
        local = tmp_path / "pulled"
        location = s3.parse_uri(cfg.drift.landing_s3 or "", "drift.landing_s3")
        pulled = landing.pull_s3_batches(location, local, 0.0, cfg.storage)

    assert sorted(pulled) == sorted([served["batch"], labelled_cut["batch"]])
    batch = landing.read_batch(local / served["batch"])
    assert batch.labels is None
    assert {f.name: f.read_bytes() for f in batch.files} == names
    batch = landing.read_batch(local / labelled_cut["batch"])
    assert sorted(zip(batch.labels or [], (f.read_bytes() for f in batch.files), strict=True)) == sorted(
        (label, data) for data, label in labelled
    )
