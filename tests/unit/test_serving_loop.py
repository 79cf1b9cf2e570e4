"""The service's loop without a model or a server: the prediction log, feedback, live quality, batches.

Predictions are handed to `ServingLoop` as the service hands them (request id,
version, images, probabilities); everything else is read back from the files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import PipelineConfig
from pipeline.monitoring.landing import read_batch
from pipeline.serving.inputs import NotFound, ServingError
from pipeline.serving.loop import ServingLoop
from pipeline.serving.predlog import log_files, read_records

CLASSES = ["cat", "dog", "owl"]


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_loop(root: Path, **serve: object) -> ServingLoop:
    cfg = PipelineConfig.model_validate(
        {"serve": {"log_fsync_seconds": 0, **serve}, "drift": {"landing": str(root / "landing")}}
    )
    return ServingLoop(cfg, root, "image-classifier")


def serve(loop: ServingLoop, request_id: str, seeds: list[int], version: str = "1", top: int = 0) -> None:
    """Log one request of len(seeds) images, each predicted as CLASSES[top] with probability 0.7."""
    probabilities = np.full((len(seeds), 3), 0.15)
    probabilities[:, top] = 0.7
    images = [png(s) for s in seeds]
    loop.record_predictions(
        request_id, version, "stable", "predict", images, (), probabilities, CLASSES, 3.0
    ).result(timeout=10)


@pytest.fixture
def loop(tmp_path: Path):
    running = make_loop(tmp_path)
    yield running
    running.stop()


def test_each_image_is_a_record_with_its_hash_size_and_stored_bytes(loop: ServingLoop, tmp_path: Path):
    serve(loop, "r1", [1, 2])
    records = list(read_records(loop.folder))
    assert [(r["kind"], r["id"], r["index"]) for r in records] == [
        ("prediction", "r1", 0),
        ("prediction", "r1", 1),
    ]
    first = records[0]
    assert first["sha256"] == hashlib.sha256(png(1)).hexdigest()
    assert first["image"] == {"width": 13, "height": 12, "format": "PNG", "bytes": len(png(1))}
    assert (loop.folder / first["stored"]).read_bytes() == png(1)
    assert first["predicted_class"] == "cat" and first["probabilities"] == {
        "cat": 0.7,
        "dog": 0.15,
        "owl": 0.15,
    }
    assert first["version"] == "1" and first["label"] == "stable" and first["latency_ms"] == 3.0


def test_feedback_scores_the_version_and_a_second_label_is_a_correction(loop: ServingLoop):
    serve(loop, "a", [1])
    serve(loop, "b", [2, 3])
    first = loop.feedback([{"id": "a", "label": "cat"}])[0]
    assert first["correct"] and not first["correction"] and first["model_version"] == "1"
    loop.feedback([{"id": "b", "index": 1, "label": "dog"}])
    figures = loop.monitoring({"stable": "1"})["versions"]["1"]
    assert (figures["labelled"], figures["accuracy"], figures["images"]) == (2, 0.5, 3)
    assert figures["mean_confidence"] == pytest.approx(0.7) and figures["predicted_class_share"] == {
        "cat": 1.0
    }

    again = loop.feedback([{"id": "a", "label": "owl"}])[0]
    assert again["correction"] and not again["correct"]
    figures = loop.monitoring({"stable": "1"})["versions"]["1"]
    assert (figures["labelled"], figures["accuracy"]) == (2, 0.0)  # replaced, not added
    feedback = [r for r in read_records(loop.folder) if r["kind"] == "feedback"]
    assert [(r["label"], r["previous"], r["correction"]) for r in feedback][-1] == ("owl", "cat", True)


def test_refused_feedback_names_the_problem_and_records_nothing(loop: ServingLoop):
    serve(loop, "a", [1])
    with pytest.raises(NotFound, match="'nope'"):
        loop.feedback([{"id": "nope", "label": "cat"}])
    with pytest.raises(NotFound, match="image 4"):
        loop.feedback([{"id": "a", "index": 4, "label": "cat"}])
    with pytest.raises(ServingError, match="'cat', 'dog', 'owl'") as refused:
        loop.feedback([{"id": "a", "label": "horse"}])
    assert refused.value.status == 400
    with pytest.raises(NotFound, match="feedback item 1"):  # all or nothing
        loop.feedback([{"id": "a", "label": "cat"}, {"id": "zzz", "label": "cat"}])
    assert not [r for r in read_records(loop.folder) if r["kind"] == "feedback"]


def test_a_restarted_loop_replays_the_log_and_a_second_process_sees_the_first(tmp_path: Path):
    first = make_loop(tmp_path)
    serve(first, "a", [1])
    other = make_loop(tmp_path)  # another worker: reads the first one's file
    serve(other, "b", [2])
    assert other.feedback([{"id": "a", "label": "cat"}])[0]["correct"]  # served by the first
    assert first.feedback([{"id": "b", "label": "dog"}])[0]["correct"] is False
    for running in (first, other):
        figures = running.monitoring({"stable": "1"})["versions"]["1"]
        assert (figures["images"], figures["labelled"], figures["accuracy"]) == (2, 2, 0.5)
    first.stop()
    other.stop()
    restarted = make_loop(tmp_path)
    figures = restarted.monitoring({"stable": "1"})["versions"]["1"]
    assert (figures["images"], figures["labelled"], figures["accuracy"]) == (2, 2, 0.5)
    assert restarted.feedback([{"id": "a", "label": "dog"}])[0]["correction"]
    restarted.stop()


def test_files_roll_and_are_never_rewritten_and_a_torn_line_is_skipped(tmp_path: Path):
    loop = make_loop(tmp_path, log_roll_mb=0.001)  # about 1 kB: a file per request or two
    serve(loop, "a", [1])
    first_file = log_files(loop.folder)[0]
    before = first_file.read_bytes()
    for n in range(6):
        serve(loop, f"r{n}", [n + 10])
    loop.stop()
    assert len(log_files(loop.folder)) > 2
    assert first_file.read_bytes().startswith(before)  # appended to, never rewritten
    with log_files(loop.folder)[-1].open("ab") as handle:
        handle.write(b'{"kind": "prediction", "id": "torn"')  # a process killed mid-write
    assert len(list(read_records(loop.folder))) == 7


def test_sampling_and_no_stored_images(tmp_path: Path):
    loop = make_loop(tmp_path, store_images=False)
    serve(loop, "a", [1])
    (record,) = read_records(loop.folder)
    assert record["sha256"] and record["stored"] is None and not (loop.folder / "images").exists()
    assert loop.cut_due(now=1e12) == []  # nothing to cut without images
    loop.stop()
    sampled = make_loop(tmp_path / "sampled", log_sample=0.25)
    assert 150 < sum(sampled.sampled() for _ in range(1000)) < 350
    sampled.stop()


def test_batches_are_cut_by_count_or_age_whole_and_labelled_by_feedback(tmp_path: Path):
    loop = make_loop(tmp_path, batch_images=3, batch_minutes=10)
    serve(loop, "a", [1, 2, 3, 4])
    assert [name.split("-")[0] for name in loop.cut_due()] == ["served"]
    (batch,) = [p for p in (tmp_path / "landing").iterdir()]
    assert not batch.name.startswith(".") and len(read_batch(batch).files) == 3
    assert {p.read_bytes() for p in batch.iterdir()} == {png(1), png(2), png(3)}
    assert loop.cut_due() == []  # one image waits, young
    later = loop.cut_due(now=1e12)  # ... until it is batch_minutes old
    assert len(later) == 1 and len(read_batch(tmp_path / "landing" / later[0]).files) == 1

    loop.feedback([{"id": "a", "index": i, "label": label} for i, label in enumerate(["cat", "dog", "dog"])])
    (labelled,) = loop.cut_due()
    read = read_batch(tmp_path / "landing" / labelled)
    assert read.labelled and sorted(read.labels or []) == ["cat", "dog", "dog"]
    cuts = [r for r in read_records(loop.folder) if r["kind"] == "cut"]
    assert [(c["labelled"], len(c["images"])) for c in cuts] == [(False, 3), (False, 1), (True, 3)]
    loop.stop()
    restarted = make_loop(tmp_path, batch_images=3, batch_minutes=10)  # nothing is cut twice
    assert restarted.cut_due(now=1e12) == []
    restarted.stop()


def test_shadow_answers_give_agreement_and_both_accuracies_on_the_same_images(loop: ServingLoop):
    serve(loop, "a", [1, 2])  # champion v1 says cat for both
    challenger = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])  # v2: cat, dog
    loop.record_shadow("a", "2", "1", ["cat", "cat"], challenger, CLASSES).result(timeout=10)
    loop.feedback([{"id": "a", "index": 0, "label": "cat"}, {"id": "a", "index": 1, "label": "dog"}])
    (pair,) = loop.monitoring({"stable": "1", "canary": "2"})["shadow"]
    assert (pair["champion_version"], pair["challenger_version"], pair["images"]) == ("1", "2", 2)
    assert (pair["agreement"], pair["labelled"]) == (0.5, 2)
    assert (pair["champion_accuracy"], pair["challenger_accuracy"]) == (0.5, 1.0)
    records = [r for r in read_records(loop.folder) if r["kind"] == "shadow"]
    assert [r["agrees"] for r in records] == [True, False]


def test_the_metrics_collector_exports_the_live_figures(loop: ServingLoop):
    from prometheus_client import CollectorRegistry, generate_latest

    serve(loop, "a", [1])
    loop.set_reference("1", {"test_accuracy": 0.9, "training_class_share": {"cat": 0.5, "dog": 0.5}})
    loop.feedback([{"id": "a", "label": "cat"}])
    registry = CollectorRegistry()
    registry.register(loop.collector(lambda: {"stable": "1"}))
    text = generate_latest(registry).decode()
    assert 'serving_live_accuracy{model_version="1"} 1.0' in text
    assert 'serving_live_reference_test_accuracy{model_version="1"} 0.9' in text
    assert 'serving_live_class_share{class_name="dog",model_version="1",source="training"} 0.5' in text
    figures = json.loads(json.dumps(loop.monitoring({"stable": "1"})))["versions"]["1"]
    assert figures["class_share_distance"] == 0.5  # all cat served against half cat in training


def test_one_call_labelling_an_image_twice_records_the_second_as_a_correction(loop: ServingLoop):
    serve(loop, "a", [1])
    answers = loop.feedback([{"id": "a", "label": "cat"}, {"id": "a", "label": "dog"}])
    assert [(a["label"], a["correction"]) for a in answers] == [("cat", False), ("dog", True)]
    feedback = [r for r in read_records(loop.folder) if r["kind"] == "feedback"]
    assert [(r["label"], r["previous"]) for r in feedback] == [("cat", None), ("dog", "cat")]
    assert loop.monitoring({"stable": "1"})["versions"]["1"]["labelled"] == 1


def test_a_label_corrected_after_its_batch_was_cut_is_reported_not_cut_again(tmp_path: Path):
    loop = make_loop(tmp_path, batch_images=1)
    serve(loop, "a", [1])
    loop.feedback([{"id": "a", "label": "cat"}])
    cut = loop.cut_due()
    assert len(cut) == 2  # the unlabelled and the labelled batch of the one image
    loop.feedback([{"id": "a", "label": "dog"}])
    assert loop.cut_due(now=1e12) == []  # one image under two classes would poison training
    (late,) = loop.monitoring({"stable": "1"})["late_corrections"]
    assert (late["batch"], late["batch_label"], late["label"]) == (cut[1], "cat", "dog")
    loop.stop()
    replayed = make_loop(tmp_path, batch_images=1)  # the log alone says the same
    assert replayed.cut_due(now=1e12) == [] and len(replayed.late_corrections) == 1
    replayed.stop()


def test_a_cut_record_read_before_its_predictions_still_takes_them_off_the_queue(tmp_path: Path):
    leader = make_loop(tmp_path, batch_images=4)
    serve(leader, "first", [1])  # the leader's file is opened first: it sorts before the other's
    worker = make_loop(tmp_path, batch_images=4)
    serve(worker, "other", [2, 3, 4])
    leader.refresh()
    (batch,) = leader.cut_due()  # its cut record, in the first file, names the other file's images
    leader.stop()
    worker.stop()
    restarted = make_loop(tmp_path, batch_images=1)  # replays the first file, then the other
    assert restarted.cut_due(now=1e12) == [], "images of a batch already cut were cut again"
    restarted.stop()
    assert len(read_batch(tmp_path / "landing" / batch).files) == 4


def test_a_stored_image_removed_by_hand_leaves_the_queue_and_the_batch_goes_on(tmp_path: Path):
    loop = make_loop(tmp_path, batch_images=2)
    serve(loop, "a", [1, 2])
    first = next(r for r in read_records(loop.folder) if r["index"] == 0)
    (loop.folder / first["stored"]).unlink()
    (batch,) = loop.cut_due()
    assert [p.read_bytes() for p in (tmp_path / "landing" / batch).iterdir()] == [png(2)]
    assert not [p for p in (tmp_path / "landing").iterdir() if p.name.startswith(".")]
    assert loop.cut_due(now=1e12) == []
    loop.stop()
