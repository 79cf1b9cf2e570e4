"""The service's half of the loop: log what it serves, take feedback, measure live quality, cut batches.

`ServingLoop` sits beside `ModelService`. Every answered prediction becomes a
record in the prediction log (predlog.py) before its response leaves; shadow
answers of the challenger and feedback labels become records too. The log is
the only truth: the in-memory state below (which logged image a feedback
label belongs to, per-version live quality, the images waiting for a batch)
is built from its records, those this process writes and those other
processes (other uvicorn workers, an earlier run) wrote, read by tailing
their files. So a restarted service, or any worker, answers feedback and
monitoring for everything in the log.

Batches: once `serve.batch_images` logged images wait (or the oldest waited
`serve.batch_minutes`), they are copied into the drift check's landing area
as `served-<time>/<image>` (unlabelled) and, for images with a feedback
label, `feedback-<time>/<class>/<image>` (labelled): written into a hidden
folder, then renamed into place, so the drift check sees a batch whole or not
at all. With `drift.landing_s3` set they are uploaded there instead. One
process cuts (it holds `<log_dir>/cutter.lock`); a `cut` record tells every
process which images went where. A crash between the rename and that record
cuts those images again into the next batch (at least once, never lost).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.registry import Collector

from pipeline.config import PipelineConfig
from pipeline.monitoring.check import share_distance
from pipeline.serving.batches import write_batch
from pipeline.serving.inputs import NotFound, ServingError
from pipeline.serving.metrics import LiveCollector
from pipeline.serving.predlog import ImageToLog, PredictionLog, Tail, log_files, now_iso

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (request id, image index in the request)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class Logged:
    """What feedback needs to know about one logged image."""

    version: str
    predicted: str
    classes: list[str]
    stored: str | None
    time: float
    shadow: tuple[str, str] | None = None  # (challenger version, its predicted class)


@dataclass
class VersionQuality:
    """Live figures of one version: its served images, their confidence and classes, its feedback."""

    images: int = 0
    confidence_sum: float = 0.0
    predicted: Counter[str] = field(default_factory=Counter)
    labelled: int = 0
    correct: int = 0


@dataclass
class ShadowPair:
    """Champion and challenger answers on the same shadowed images, and their feedback."""

    images: int = 0
    agree: int = 0
    labelled: int = 0
    champion_correct: int = 0
    challenger_correct: int = 0


@dataclass
class Pending:
    """A logged image waiting for its batch."""

    time: float
    stored: str
    label: str | None = None


class ServingLoop:
    """The prediction log, feedback, live quality and batch cutting of one service process.

    Args:
        cfg: the pipeline's settings (`serve` for the log and batches, `drift` for the landing area).
        root: the project root relative paths are resolved against.
        model_name: the served model.
        cut_batches: cut landing batches (off for a service whose traffic is not the product's).
    """

    def __init__(self, cfg: PipelineConfig, root: Path, model_name: str, cut_batches: bool = True) -> None:
        serve = cfg.serve
        self.cfg, self.serve, self.model_name = cfg, serve, model_name
        self.folder = serve.log_dir if serve.log_dir.is_absolute() else root / serve.log_dir
        landing = cfg.drift.landing
        self.landing = landing if landing.is_absolute() else root / landing
        self.cut_batches = cut_batches and serve.store_images
        self._lock = threading.RLock()
        self._index: OrderedDict[Key, Logged] = OrderedDict()
        self._labels: dict[Key, str] = {}
        self._quality: dict[str, VersionQuality] = {}
        self._shadow: dict[tuple[str, str], ShadowPair] = {}
        self._references: dict[str, dict[str, Any]] = {}
        self._unlabelled: OrderedDict[Key, Pending] = OrderedDict()
        self._labelled: OrderedDict[Key, Pending] = OrderedDict()
        self._cut_labels: dict[Key, tuple[str, str]] = {}  # labelled image -> (its label, its batch)
        self.late_corrections: list[dict[str, Any]] = []  # relabelled after their batch was cut
        self._tails: dict[Path, Tail] = {}
        # feedback and shadow records read before their prediction (another process's file came first)
        self._early: OrderedDict[Key, list[dict[str, Any]]] = OrderedDict()
        self._feedback_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leader: int | None = None
        self.batches_cut: list[str] = []
        self.log = PredictionLog(
            self.folder,
            serve.store_images,
            int(serve.log_roll_mb * 1024 * 1024),
            serve.log_roll_minutes * 60.0,
            serve.log_fsync_seconds,
            on_written=self._apply,
        )
        self.refresh()  # what earlier runs and other workers logged

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Tail other processes' files and cut batches in a background thread."""
        self._thread = threading.Thread(target=self._background, name="serving-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.log.close()
        if self._leader is not None:
            os.close(self._leader)
            self._leader = None

    def _background(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.refresh()
                if self.cut_batches and self._lead():
                    self.cut_due()
            except Exception:  # keep going: the next round tries again
                log.exception("the serving loop's background round failed")

    def _lead(self) -> bool:
        """Whether this process cuts batches (it holds the cutter lock; taken over if its holder dies)."""
        if self._leader is not None:
            return True
        fd = os.open(self.folder / "cutter.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._leader = fd
        return True

    # -- records ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Apply the records other processes appended since the last read."""
        with self._refresh_lock:  # request threads and the background thread: each line applied once
            for path in log_files(self.folder):
                if path in self.log.own_files:
                    continue
                tail = self._tails.setdefault(path, Tail(path))
                for record in tail.read():
                    self._apply(record)

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        with self._lock:
            try:
                if kind == "prediction":
                    self._apply_prediction(record)
                elif kind == "shadow":
                    self._apply_shadow(record)
                elif kind == "feedback":
                    self._apply_feedback(record)
                elif kind == "cut":
                    for request_id, index, label, _ in record["images"]:
                        self._apply_cut_image(
                            {"kind": "cut_image", "id": request_id, "index": index, "label": label,
                             "labelled": record["labelled"], "batch": record["batch"]}
                        )  # fmt: skip
            except (KeyError, TypeError, ValueError) as error:  # a record this version cannot read
                log.warning("prediction log: a %s record skipped (%r): %s", kind, error, str(record)[:200])

    def _apply_cut_image(self, cut: dict[str, Any]) -> None:
        """One image of a cut batch leaves the queue it was cut from. (A cut record in one process's
        file can be read before the prediction in another's: it then waits for it, as feedback does.)"""
        key = (cut["id"], cut["index"])
        if key not in self._index:
            self._wait_for_prediction(key, cut)
            return
        if not cut["labelled"]:
            self._unlabelled.pop(key, None)
            return
        waiting = self._labelled.pop(key, None)
        self._cut_labels[key] = (cut["label"], cut["batch"])
        if waiting is not None and waiting.label != cut["label"]:  # relabelled while it was being cut
            self._late_correction(key, cut["batch"], cut["label"], str(waiting.label))

    def _apply_prediction(self, record: dict[str, Any]) -> None:
        key = (record["id"], record["index"])
        logged = Logged(
            record["version"],
            record["predicted_class"],
            list(record["probabilities"]),
            record.get("stored"),
            _epoch(record["time"]),
        )
        self._index[key] = logged
        early = self._early.pop(key, [])
        while len(self._index) > self.serve.feedback_window:
            old, _ = self._index.popitem(last=False)
            self._labels.pop(old, None)
            self._cut_labels.pop(old, None)
        quality = self._quality.setdefault(logged.version, VersionQuality())
        quality.images += 1
        quality.confidence_sum += float(record["confidence"])
        quality.predicted[logged.predicted] += 1
        if logged.stored:
            self._unlabelled[key] = Pending(logged.time, logged.stored)
        apply = {
            "shadow": self._apply_shadow,
            "feedback": self._apply_feedback,
            "cut_image": self._apply_cut_image,
        }
        for record in early:
            apply[record["kind"]](record)

    def _wait_for_prediction(self, key: Key, record: dict[str, Any]) -> None:
        self._early.setdefault(key, []).append(record)
        while len(self._early) > self.serve.feedback_window:  # predictions that never come (evicted)
            self._early.popitem(last=False)

    def _apply_shadow(self, record: dict[str, Any]) -> None:
        key = (record["id"], record["index"])
        logged = self._index.get(key)
        if logged is None:
            self._wait_for_prediction(key, record)
            return
        logged.shadow = (record["version"], record["predicted_class"])
        pair = self._shadow.setdefault((logged.version, record["version"]), ShadowPair())
        pair.images += 1
        pair.agree += int(record["predicted_class"] == logged.predicted)
        label = self._labels.get(key)
        if label is not None:
            self._score_shadow(pair, logged, label, +1)

    def _apply_feedback(self, record: dict[str, Any]) -> None:
        key = (record["id"], record["index"])
        logged = self._index.get(key)
        if logged is None:
            self._wait_for_prediction(key, record)
            return
        previous = self._labels.get(key)
        self._labels[key] = record["label"]
        quality = self._quality.setdefault(logged.version, VersionQuality())
        if previous is None:
            quality.labelled += 1
        else:
            quality.correct -= int(previous == logged.predicted)
        quality.correct += int(record["label"] == logged.predicted)
        if logged.shadow is not None:
            pair = self._shadow.setdefault((logged.version, logged.shadow[0]), ShadowPair())
            if previous is not None:
                self._score_shadow(pair, logged, previous, -1)
            self._score_shadow(pair, logged, record["label"], +1)
        cut = self._cut_labels.get(key)
        if cut is not None and cut[0] != record["label"]:
            self._late_correction(key, cut[1], cut[0], record["label"])
        elif cut is None and logged.stored:
            self._labelled[key] = Pending(_epoch(record["time"]), logged.stored, record["label"])
            self._labelled.move_to_end(key)

    def _late_correction(self, key: Key, batch: str, batch_label: str, label: str) -> None:
        """A label that changed after its image was cut into a labelled batch (maybe trained on
        already). Cutting it again would put one image under two classes: a person fixes the batch,
        told here and by the monitoring endpoint."""
        self.late_corrections.append(
            {"id": key[0], "index": key[1], "batch": batch, "batch_label": batch_label, "label": label}
        )
        del self.late_corrections[:-100]
        log.warning(
            "image %s of request %s relabelled %r after batch %s was cut with %r; fix that batch by hand",
            key[1], key[0], label, batch, batch_label,
        )  # fmt: skip

    @staticmethod
    def _score_shadow(pair: ShadowPair, logged: Logged, label: str, sign: int) -> None:
        assert logged.shadow is not None
        pair.labelled += sign
        pair.champion_correct += sign * int(logged.predicted == label)
        pair.challenger_correct += sign * int(logged.shadow[1] == label)

    # -- the request side ------------------------------------------------------------------------

    def sampled(self) -> bool:
        """Whether this request is logged (serve.log_sample)."""
        rate = self.serve.log_sample
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def record_predictions(
        self,
        request_id: str,
        version: str,
        label: str | None,
        endpoint: str,
        images: list[bytes],
        checked: Sequence[Any],
        probabilities: Any,
        classes: list[str],
        latency_ms: float,
    ) -> Any:
        """Write one record per image (`checked`: each image's (width, height, format), when known).

        Returns:
            A done future, failed when the disk refused.
        """
        when = now_iso()
        records, pending = [], []
        for index, (data, row) in enumerate(zip(images, np.asarray(probabilities).tolist(), strict=True)):
            scores = {name: round(p, 6) for name, p in zip(classes, row, strict=True)}
            top = max(range(len(classes)), key=row.__getitem__)
            record: dict[str, Any] = {
                "kind": "prediction",
                "time": when,
                "id": request_id,
                "index": index,
                "model": self.model_name,
                "version": version,
                "label": label,
                "endpoint": endpoint,
                "predicted_class": classes[top],
                "confidence": round(row[top], 6),
                "probabilities": scores,
                "latency_ms": round(latency_ms, 3),
            }
            records.append(record)
            info = checked[index] if index < len(checked) else None
            pending.append(ImageToLog(data, record, info))
        return self.log.append(records, pending)

    def record_shadow(
        self,
        request_id: str,
        version: str,
        champion_version: str,
        champion_classes: list[str],
        probabilities: Any,
        classes: list[str],
    ) -> Any:
        """Queue the challenger's answers on a shadowed request (written when they are ready)."""
        when = now_iso()
        records = []
        for index, row in enumerate(probabilities):
            top = max(range(len(classes)), key=lambda i: float(row[i]))
            records.append(
                {
                    "kind": "shadow",
                    "time": when,
                    "id": request_id,
                    "index": index,
                    "version": version,
                    "label": "canary",
                    "champion_version": champion_version,
                    "predicted_class": classes[top],
                    "confidence": round(float(row[top]), 6),
                    "probabilities": {n: round(float(p), 6) for n, p in zip(classes, row, strict=True)},
                    "agrees": classes[top] == champion_classes[index],
                }
            )
        return self.log.append(records)

    def feedback(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Attach true labels to logged images: all of them, or none when one is refused.

        Raises:
            NotFound: an id (or index) that is not in the log (404).
            ServingError: a malformed item or a class the model does not know (400).
        """
        with self._feedback_lock:
            checked = [
                self._check_feedback(position, item, len(items)) for position, item in enumerate(items)
            ]
            when = now_iso()
            records, answers = [], []
            given: dict[Key, str] = {}  # labels earlier in this call (not written yet)
            for key, label, logged in checked:
                with self._lock:
                    previous = given.get(key, self._labels.get(key))
                given[key] = label
                records.append(
                    {
                        "kind": "feedback",
                        "time": when,
                        "id": key[0],
                        "index": key[1],
                        "label": label,
                        "previous": previous,
                        "correction": previous is not None,
                    }
                )
                answers.append(
                    {
                        "id": key[0],
                        "index": key[1],
                        "label": label,
                        "predicted_class": logged.predicted,
                        "correct": label == logged.predicted,
                        "correction": previous is not None,
                        "model_version": logged.version,
                    }
                )
            self.log.append(records).result(timeout=60)
        return answers

    def _check_feedback(self, position: int, item: Any, count: int) -> tuple[Key, str, Logged]:
        where = f"feedback item {position}: " if count > 1 else ""
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
            raise ServingError(
                f'{where}send {{"id": "<request id>", "label": "<class>"}} (and "index" for the n-th image)'
            )
        index = item.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ServingError(f"{where}index must be a whole number >= 0, got {index!r}")
        key = (item["id"], index)
        logged = self._index.get(key)
        if logged is None:
            self.refresh()  # another worker may have served it
            logged = self._index.get(key)
        if logged is None:
            known = any(k[0] == item["id"] for k in list(self._index))
            what = f"image {index} of request {item['id']!r}" if known else f"request id {item['id']!r}"
            raise NotFound(
                f"{where}{what} is not in the prediction log (not served, not sampled by "
                f"serve.log_sample = {self.serve.log_sample:g}, or older than the last "
                f"serve.feedback_window = {self.serve.feedback_window} images)"
            )
        label = str(item["label"])
        if label not in logged.classes:
            raise ServingError(
                f"{where}unknown class {label!r}; {self.model_name} version {logged.version} knows "
                + ", ".join(repr(c) for c in logged.classes)
            )
        return key, label, logged

    # -- live quality ----------------------------------------------------------------------------

    def set_reference(self, version: str, reference: dict[str, Any] | None) -> None:
        """The version's test accuracy and training class shares, to compare live figures with."""
        if reference is not None:
            self._references[version] = reference

    def monitoring(self, served: dict[str, str]) -> dict[str, Any]:
        """Per version: live accuracy (and its count), class shares against training, mean confidence;
        champion-challenger agreement and accuracies on the same shadowed images."""
        self.refresh()
        with self._lock:
            labels_of = {version: label for label, version in served.items()}
            versions = {}
            for version in sorted(set(self._quality) | set(served.values()), key=_version_order):
                quality = self._quality.get(version, VersionQuality())
                reference = self._references.get(version, {})
                versions[version] = {
                    "label": labels_of.get(version),
                    "images": quality.images,
                    "mean_confidence": _ratio(quality.confidence_sum, quality.images),
                    "labelled": quality.labelled,
                    "accuracy": _ratio(quality.correct, quality.labelled),
                    "reference_test_accuracy": reference.get("test_accuracy"),
                    "predicted_class_share": _shares(quality.predicted),
                    "training_class_share": reference.get("training_class_share"),
                    "class_share_distance": _distance(
                        quality.predicted, reference.get("training_class_share")
                    ),
                }
            shadow = [
                {
                    "champion_version": champion,
                    "challenger_version": challenger,
                    "images": pair.images,
                    "agreement": _ratio(pair.agree, pair.images),
                    "labelled": pair.labelled,
                    "champion_accuracy": _ratio(pair.champion_correct, pair.labelled),
                    "challenger_accuracy": _ratio(pair.challenger_correct, pair.labelled),
                }
                for (champion, challenger), pair in sorted(self._shadow.items())
            ]
        return {
            "model": self.model_name,
            "served": served,
            "versions": versions,
            "shadow": shadow,
            "late_corrections": list(self.late_corrections),
            "log": {"folder": str(self.folder), "sample": self.serve.log_sample},
        }

    def collector(self, served: Callable[[], dict[str, str]]) -> Collector:
        """A Prometheus collector of the live figures, read at each scrape (`served()`: {label: version})."""
        return LiveCollector(lambda: self.monitoring(served()))

    # -- batches ---------------------------------------------------------------------------------

    def cut_due(self, now: float | None = None) -> list[str]:
        """Cut every batch that is due: full (serve.batch_images) or old (serve.batch_minutes)."""
        now = time.time() if now is None else now
        cut = []
        for labelled, pending in ((False, self._unlabelled), (True, self._labelled)):
            while True:
                with self._lock:
                    waiting = list(pending.items())[: self.serve.batch_images]
                full = len(waiting) >= self.serve.batch_images
                old = bool(waiting) and now - waiting[0][1].time >= self.serve.batch_minutes * 60.0
                if not (full or old):
                    break
                cut.append(self._cut(waiting, labelled))
        return cut

    def _cut(self, waiting: list[tuple[Key, Pending]], labelled: bool) -> str:
        name = f"{'feedback' if labelled else 'served'}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        files: dict[str, Path] = {}  # relative path in the batch -> stored image
        for key, item in waiting:
            stored = Path(item.stored)
            if not (self.folder / stored).is_file():  # removed by hand: it leaves the queue, named
                log.warning(
                    "image %s of request %s: %s is gone; not in batch %s", key[1], key[0], stored, name
                )
                continue
            relative = f"{item.label}/{stored.name}" if labelled else stored.name
            files[relative] = self.folder / stored
        destination = self._write_batch(name, files) if files else "(nothing: every image was gone)"
        images = [[key[0], key[1], item.label, item.stored] for key, item in waiting]
        record = {
            "kind": "cut",
            "time": now_iso(),
            "batch": name,
            "labelled": labelled,
            "destination": destination,
            "images": images,
        }
        self.log.append([record]).result(timeout=60)
        self.batches_cut.append(name)
        log.info(
            "cut %s batch %s: %d images -> %s",
            "labelled" if labelled else "unlabelled",
            name,
            len(files),
            destination,
        )
        return name

    def _write_batch(self, name: str, files: dict[str, Path]) -> str:
        return write_batch(name, files, self.landing, self.cfg.drift.landing_s3, self.cfg.storage)


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole else None


def _shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: round(count / total, 6) for name, count in sorted(counts.items())} if total else {}


def _distance(predicted: Counter[str], training: dict[str, float] | None) -> float | None:
    """Total variation distance between the served classes and training's (None without both)."""
    if not training or not predicted:
        return None
    return share_distance(_shares(predicted), training)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)
