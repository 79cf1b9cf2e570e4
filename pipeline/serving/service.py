"""The model side of the service: which versions serve under which label, hot swaps, and predictions.

The HTTP layer (serving/app.py) turns requests into calls of `ModelService`
and its answers (or `ServingError`s) into responses; nothing here knows about
HTTP beyond the status a refusal carries.

Labels follow the registry's aliases: `stable` is the `champion`, `canary` the
`challenger`. A poller checks them every `serve.poll_seconds`; a version that
moves in is loaded beside the serving one, warmed up, then swapped in under a
lock, and a version no label points to any more is released once the requests
it already took are answered. A version that fails to load leaves the current
one serving and is shown UNAVAILABLE, with the reason, in the status endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from pipeline.config import ServeConfig
from pipeline.errors import PipelineError
from pipeline.serving import inputs
from pipeline.serving.batching import Batcher
from pipeline.serving.inputs import NotFound, NotReady, ServingError
from pipeline.serving.loop import ServingLoop, new_request_id
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.model import ServableVersion
from pipeline.serving.shadow import ShadowJob, ShadowScorer

log = logging.getLogger(__name__)

STABLE, CANARY = "stable", "canary"
RETRY_FAILED_SECONDS = 300.0  # a version that failed to load is tried again no sooner than this
# predict_async reads and checks a request on the event loop (no thread hop) when its body is this
# small and no image has more pixels than this (a decode of well under a millisecond); else in a thread.
INLINE_BODY_BYTES = 64 * 1024
INLINE_IMAGE_PIXELS = 256 * 256


class Source(Protocol):
    """Where versions come from: which version each label should serve, and its SavedModel folder."""

    model_name: str

    def wanted(self) -> dict[str, str]:
        """{label: version} as the source says now (labels without a version are left out)."""
        ...

    def fetch(self, version: str) -> Path:
        """A local SavedModel folder of `version`."""
        ...

    def describe(self) -> str:
        """Where the versions come from, for messages."""
        ...

    def nothing_to_serve(self) -> str:
        """What to do when there is no version for `stable` yet."""
        ...

    def reference(self, version: str) -> dict[str, Any] | None:
        """The version's test accuracy and training class shares (live quality compares with them)."""
        ...


@dataclass
class VersionState:
    """TF Serving's per-version state: START, LOADING, AVAILABLE, UNLOADING, END or UNAVAILABLE."""

    state: str
    error: str = ""
    since: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Served:
    """A version resolved for one request, with the batcher that runs it."""

    servable: ServableVersion
    batcher: Batcher
    label: str | None

    @property
    def version(self) -> str:
        return self.servable.version


class ModelService:
    """Loads versions from a source, keeps them current, and answers predictions.

    Args:
        cfg: the `serve` settings.
        max_pixels: larger images are refused (ingest.max_pixels).
        source: where versions come from.
        metrics: the service's metrics (a fresh set when None).
        loop: the prediction log, feedback, live quality and batches (none: nothing is logged).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        max_pixels: int,
        source: Source,
        metrics: ServingMetrics | None = None,
        loop: ServingLoop | None = None,
    ) -> None:
        self.cfg = cfg
        self.max_pixels = max_pixels
        self.source = source
        self.name = source.model_name
        self.metrics = metrics or ServingMetrics()
        self.loop = loop
        self._shadow: ShadowScorer | None = None
        if loop is not None and cfg.shadow_fraction > 0:
            self._shadow = ShadowScorer(cfg.max_shadow_images, self.metrics.shadow_skipped.inc)
        if loop is not None:
            self.metrics.registry.register(loop.collector(self.served))
        self._lock = threading.Lock()
        self._labels: dict[str, Served] = {}  # label -> version serving it
        self._loaded: dict[str, Served] = {}  # version -> loaded version (labelled or being released)
        self._states: dict[str, VersionState] = {}
        self._failed_at: dict[str, float] = {}
        self._poll_error = ""
        self._polled = False
        self._arriving = 0  # requests being read and checked, not yet handed to a batcher
        self._arriving_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, poll: bool = True) -> None:
        """Start the poller (its first poll runs at once), or poll once now when `poll` is False."""
        if self.loop is not None:
            self.loop.start()
        if not poll:
            self.poll_once()
            return
        self._poller = threading.Thread(target=self._poll_loop, name="registry-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop polling and release every version."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        with self._lock:
            self._labels = {}
        self._release_unlabelled()
        if self._shadow is not None:
            self._shadow.close()
        if self.loop is not None:
            self.loop.stop()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as error:  # keep polling: a dead poller would never swap again
                self._poll_error = (
                    f"polling {self.source.describe()} failed: {error.__class__.__name__}: {error}"
                )
                log.exception(
                    "polling %s failed; trying again in %gs", self.source.describe(), self.cfg.poll_seconds
                )
            self._stop.wait(self.cfg.poll_seconds)

    def poll_once(self) -> None:
        """Bring every label to the version the source names now (load, warm up, swap, release)."""
        try:
            wanted = self.source.wanted()
        except PipelineError as error:
            self._poll_error = str(error)
            self._polled = True
            log.warning("could not read %s; serving what is loaded: %s", self.source.describe(), error)
            return
        self._poll_error = ""
        for label, version in sorted(wanted.items(), key=lambda item: item[0] != STABLE):
            current = self._labels.get(label)
            if current is not None and current.version == version:
                continue
            served = self._served_version(version) or self._load(version)
            if served is None:
                continue
            with self._lock:
                self._labels[label] = Served(served.servable, served.batcher, label)
            self.metrics.loaded.labels(version, label).set(1)
            if current is not None:
                self.metrics.loaded.labels(current.version, label).set(0)
            log.info("%s %s now serves version %s", self.name, label, version)
        for label in [label for label in self._labels if label not in wanted]:
            with self._lock:
                gone = self._labels.pop(label)
            self.metrics.loaded.labels(gone.version, label).set(0)
            log.info("%s %s removed (version %s no longer has its alias)", self.name, label, gone.version)
        self._release_unlabelled()
        self._polled = True

    def _served_version(self, version: str) -> Served | None:
        return self._loaded.get(version)

    def _load(self, version: str) -> Served | None:
        failed = self._failed_at.get(version)
        if failed is not None and time.monotonic() - failed < RETRY_FAILED_SECONDS:
            return None
        self._states[version] = VersionState("LOADING")
        try:
            folder = self.source.fetch(version)
            servable = ServableVersion.load(self.name, version, folder, self.cfg.warmup_requests)
        except Exception as error:  # PipelineError, LoadFailed, a disk or network error: all the same here
            self._failed_at[version] = time.monotonic()
            self._states[version] = VersionState("UNAVAILABLE", str(error))
            self.metrics.model_load_failures.labels(version).inc()
            log.error(
                "could not load %s version %s; the current one keeps serving: %s", self.name, version, error
            )
            return None
        self._failed_at.pop(version, None)
        batcher = Batcher(
            servable.predict,
            self.cfg.max_batch_size,
            self.cfg.batch_timeout_ms,
            observe=lambda images, requests, secs: self.metrics.observe_batch(
                version, images, requests, secs
            ),
            name=f"{self.name}-{version}",
            arriving=lambda: self._arriving,
            max_batch_pixels=self.cfg.max_request_pixels,
        )
        self._states[version] = VersionState("AVAILABLE")
        self.metrics.model_loads.labels(version).inc()
        if self.loop is not None:
            try:
                self.loop.set_reference(version, self.source.reference(version))
            except Exception as error:  # live figures are then shown without the reference
                log.warning("%s version %s: no reference for live quality (%s)", self.name, version, error)
        log.info("loaded %s version %s from %s", self.name, version, folder)
        self._loaded[version] = Served(servable, batcher, None)
        return self._loaded[version]

    def _release_unlabelled(self) -> None:
        """Release loaded versions no label points to: their batcher answers what it queued, then stops.

        A request that resolved a released version before the swap still gets its answer: its
        batcher runs it alone, on the version it resolved, which lives as long as the request.
        """
        live = {item.version for item in self._labels.values()}
        for version in [v for v in self._loaded if v not in live]:
            self._states[version] = VersionState("UNLOADING")
            self._loaded.pop(version).batcher.close()
            self._states[version] = VersionState("END")
            log.info("released %s version %s", self.name, version)

    # -- status ----------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Whether `stable` is loaded and warmed up, and why not."""
        stable = self._labels.get(STABLE)  # the poller swaps these dicts' entries: read each once
        if stable is not None:
            return True, f"{self.name} version {stable.version} is ready"
        states = list(self._states.items())
        loading = [v for v, s in states if s.state == "LOADING"]
        if loading:
            return False, f"{self.name} version {loading[0]} is loading"
        failed = [s.error for _, s in states if s.state == "UNAVAILABLE"]
        if failed:
            return False, f"no version of {self.name} could be loaded: {failed[-1]}"
        if self._poll_error:
            return False, self._poll_error
        if not self._polled:
            return False, f"{self.name}: looking for a version in {self.source.describe()}"
        return False, self.source.nothing_to_serve()

    def served(self) -> dict[str, str]:
        """{label: version} served now."""
        return {label: item.version for label, item in self._labels.items()}

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise NotFound(f"Servable not found: unknown model {name!r}; this service serves {self.name!r}")

    def status(self, name: str, version: str | None = None, label: str | None = None) -> dict[str, Any]:
        """`GET /v1/models/{name}[/versions/N | /labels/L]`: each known version's state, newest first.

        Raises:
            NotFound: an unknown model, version or label, or no version known yet (as TF Serving).
        """
        self._check_name(name)
        states = dict(self._states)
        if label is not None:
            version = self.resolve(name, label=label).version
        if not states:
            raise NotFound(f"{name} has no version loaded or loading yet: {self.ready()[1]}")
        if version is not None:
            if version not in states:
                raise NotFound(f"{name} has no version {version} known to this service: {sorted(states)}")
            states = {version: states[version]}
        return {
            "model_version_status": [
                {
                    "version": v,
                    "state": s.state,
                    "status": {
                        "error_code": "UNKNOWN" if s.state == "UNAVAILABLE" else "OK",
                        "error_message": s.error,
                    },
                }
                for v, s in sorted(states.items(), key=lambda item: -int(item[0]) if item[0].isdigit() else 0)
            ]
        }

    def resolve(self, name: str, version: str | None = None, label: str | None = None) -> Served:
        """The served version a request names (by version, by label, or `stable` by default).

        Raises:
            NotFound: unknown model, version or label (404).
            NotReady: nothing loaded for it yet (503).
        """
        self._check_name(name)
        labels = dict(self._labels)
        if version is not None:
            for item in labels.values():
                if item.version == version:
                    return item
            raise NotFound(
                f"{name} version {version} is not served; served versions: "
                + (", ".join(f"{v.version} ({k})" for k, v in labels.items()) or "none")
            )
        label = label or STABLE
        if label not in (STABLE, CANARY):
            raise NotFound(
                f"unknown label {label!r}; the labels are '{STABLE}' (champion) and '{CANARY}' (challenger)"
            )
        if label in labels:
            return labels[label]
        if label == CANARY:
            raise NotFound(f"{name} has no '{CANARY}' version: no version carries the 'challenger' alias")
        raise NotReady(self.ready()[1])

    def metadata(self, name: str, version: str | None = None, label: str | None = None) -> dict[str, Any]:
        """`GET /v1/models/{name}[/versions/N]/metadata`."""
        return self.resolve(name, version, label).servable.metadata()

    # -- predictions -----------------------------------------------------------------------------

    def run(self, served: Served, images: list[bytes], pixels: int = 0) -> dict[str, np.ndarray]:
        """The served version's outputs on checked images (batched with other requests).

        Raises:
            ServingError: (400) naming the image the model's decoder could not read.
        """
        try:
            outputs = served.batcher.run(images, pixels)
        except tf.errors.InvalidArgumentError:
            for index, image in enumerate(images):  # which one: call each alone
                try:
                    served.servable.predict([image])
                except tf.errors.InvalidArgumentError as error:
                    message = str(error).splitlines()[0][:200]
                    raise ServingError(
                        f"instance {index}: the model's image decoder cannot read it ({message})"
                    ) from None
            raise
        return outputs

    def predict(
        self, name: str, body: bytes, version: str | None = None, label: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """`POST /v1/models/{name}[/versions/N | /labels/L]:predict`: TF Serving's answer and the version.

        Raises:
            ServingError: 400 for a bad request or image, 404 or 503 from `resolve`.
        """
        started = time.perf_counter()
        served, request = self.prepare(name, body, version, label)
        outputs = self.run(served, request.images, request.pixels)
        result, version_served = self.answer(served, request, outputs)
        request_id = result["request_id"] = new_request_id()
        written = self._log(request_id, served, request, outputs, started, "predict")
        if written is not None:
            written.result()
            self._shadow_score(request_id, served, request.images, outputs)
        return result, version_served

    async def predict_async(
        self, name: str, body: bytes, version: str | None = None, label: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """`predict` for an asyncio server: a batched request waits for its shared model call without
        holding a thread, and only small requests of small images are read and checked on the loop.
        """
        with self._handling():
            return await self._predict_async(name, body, version, label)

    async def _predict_async(
        self, name: str, body: bytes, version: str | None, label: str | None
    ) -> tuple[dict[str, Any], str]:
        started = time.perf_counter()
        try:
            if len(body) > INLINE_BODY_BYTES:
                raise inputs.DecodeElsewhere("a large body")
            served, request = self.prepare(name, body, version, label, decode_limit=INLINE_IMAGE_PIXELS)
        except inputs.DecodeElsewhere:
            served, request = await asyncio.to_thread(self.prepare, name, body, version, label)
        if served.batcher.enabled:
            try:
                outputs = await asyncio.wrap_future(served.batcher.submit(request.images, request.pixels))
            except Exception:  # `run` names the image the model could not read, or raises as it is
                outputs = await asyncio.to_thread(self.run, served, request.images, request.pixels)
        else:
            outputs = await asyncio.to_thread(self.run, served, request.images, request.pixels)
        result, version_served = self.answer(served, request, outputs)
        request_id = result["request_id"] = new_request_id()
        if self.cfg.log_fsync_seconds == 0:  # an fsync per answer: not on the event loop
            written = await asyncio.to_thread(
                self._log, request_id, served, request, outputs, started, "predict"
            )
        else:  # one os.write: cheaper here than a thread hop
            written = self._log(request_id, served, request, outputs, started, "predict")
        if written is not None:  # done: the record is in the log before the answer leaves
            written.result()
            self._shadow_score(request_id, served, request.images, outputs)
        return result, version_served

    def _label_of(self, served: Served) -> str | None:
        if served.label is not None:
            return served.label
        return next((label for label, item in self._labels.items() if item.version == served.version), None)

    def _log(
        self,
        request_id: str,
        served: Served,
        request: inputs.PredictRequest,
        outputs: dict[str, np.ndarray],
        started: float,
        endpoint: str,
    ) -> Future[None] | None:
        """Write the request's records (None when it is not logged: no loop, or not sampled)."""
        if self.loop is None or not self.loop.sampled():
            return None
        return self.loop.record_predictions(
            request_id,
            served.version,
            self._label_of(served),
            endpoint,
            request.images,
            request.checked,
            outputs["probabilities"],
            [inputs.text(c) for c in outputs["class_names"][0]],
            (time.perf_counter() - started) * 1000.0,
        )

    def _shadow_score(
        self,
        request_id: str | None,
        served: Served,
        images: list[bytes],
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Queue a logged `stable` request for the challenger (serve.shadow_fraction of them; callers
        pass only requests whose records were written, so each shadow answer has its prediction).

        Scored off the request path, while the service is idle (pipeline/serving/shadow.py); the
        answers are logged when ready and never waited for.
        """
        canary = self._labels.get(CANARY)
        if (
            self._shadow is None
            or self.loop is None
            or request_id is None
            or canary is None
            or canary.version == served.version
            or self._label_of(served) != STABLE
            or random.random() >= self.cfg.shadow_fraction
        ):
            return
        loop = self.loop
        champion_classes = [inputs.text(c) for c in outputs["predicted_class"]]

        def done(shadow: dict[str, np.ndarray]) -> None:
            self.metrics.shadow_images.labels(canary.version).inc(len(images))
            loop.record_shadow(
                request_id,
                canary.version,
                served.version,
                champion_classes,
                shadow["probabilities"],
                [inputs.text(c) for c in shadow["class_names"][0]],
            )

        self._shadow.submit(ShadowJob(len(images), lambda: canary.servable.predict(images), done))

    @contextmanager
    def _handling(self) -> Iterator[None]:
        """A prediction request in progress: the shadow scorer waits for none to be."""
        if self._shadow is None:
            yield
            return
        self._shadow.request_started()
        try:
            yield
        finally:
            self._shadow.request_finished()

    def prepare(
        self,
        name: str,
        body: bytes,
        version: str | None = None,
        label: str | None = None,
        decode_limit: int | None = None,
    ) -> tuple[Served, inputs.PredictRequest]:
        """The first half of `predict`: the version it asks for, and its images read and checked.

        Raises:
            ServingError: 400 for a bad request or image, 404 or 503 from `resolve`.
        """
        served = self.resolve(name, version, label)
        with self._on_the_way():
            request = inputs.parse_predict(body, self.cfg.max_instances)
            checked = self._checked([(image, None) for image in request.images], decode_limit)
        return served, dataclasses.replace(request, pixels=sum(i.pixels for i in checked), checked=checked)

    def _checked(
        self, images: list[tuple[bytes, str | None]], decode_limit: int | None = None
    ) -> tuple[inputs.ImageInfo, ...]:
        """Check each image (named by index, or file name), and their pixels together against the budget."""
        checked = tuple(
            inputs.check_image(image, self.max_pixels, index, filename, decode_limit)
            for index, (image, filename) in enumerate(images)
        )
        total = sum(info.pixels for info in checked)
        if total > self.cfg.max_request_pixels:
            raise ServingError(
                f"the request's {len(images)} images hold {total} pixels together, over "
                f"serve.max_request_pixels {self.cfg.max_request_pixels}; send fewer or smaller images"
            )
        return checked

    def answer(
        self, served: Served, request: inputs.PredictRequest, outputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], str]:
        """The second half of `predict`: the model's outputs as TF Serving's answer, and the version."""
        self.metrics.observe_predictions(served.version, [inputs.text(c) for c in outputs["predicted_class"]])
        return inputs.response(outputs, request.layout), served.version

    def predict_files(self, files: list[tuple[str, bytes]], top_k: int | None = None) -> dict[str, Any]:
        """`POST /predict`: the top-k classes of each uploaded file, the version and the latency.

        Raises:
            ServingError: 400 for no file, too many, or a file that is not a usable image.
        """
        with self._handling():
            return self._predict_files(files, top_k)

    def _predict_files(self, files: list[tuple[str, bytes]], top_k: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        served = self.resolve(self.name)
        if not files:
            raise ServingError('no file uploaded; send multipart/form-data with one or more "file" fields')
        if len(files) > self.cfg.max_instances:
            raise ServingError(
                f"{len(files)} files; the limit is serve.max_instances = {self.cfg.max_instances}"
            )
        with self._on_the_way():
            checked = self._checked([(data, filename) for filename, data in files])
        pixels = sum(info.pixels for info in checked)
        images = [data for _, data in files]
        outputs = self.run(served, images, pixels)
        self.metrics.observe_predictions(served.version, [inputs.text(c) for c in outputs["predicted_class"]])
        request_id = new_request_id()
        written = self._log(
            request_id,
            served,
            inputs.PredictRequest(images, "row", pixels, checked),
            outputs,
            started,
            "upload",
        )
        k = min(top_k or self.cfg.top_k, outputs["probabilities"].shape[1])
        names = [inputs.text(c) for c in outputs["class_names"][0]]
        predictions = []
        for index, ((filename, _), probabilities) in enumerate(
            zip(files, outputs["probabilities"], strict=True)
        ):
            order = [int(i) for i in np.argsort(-probabilities)[:k]]
            predictions.append(
                {
                    "index": index,
                    "file": filename,
                    "predicted_class": names[order[0]],
                    "top_k": [{"class": names[i], "probability": float(probabilities[i])} for i in order],
                }
            )
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        if written is not None:
            written.result()
            self._shadow_score(request_id, served, images, outputs)
        return {
            "model_name": self.name,
            "model_version": served.version,
            "label": served.label,
            "request_id": request_id,
            "latency_ms": latency_ms,
            "class_names": names,
            "predictions": predictions,
        }

    # -- the loop --------------------------------------------------------------------------------

    def feedback(self, body: Any) -> dict[str, Any]:
        """`POST /v1/feedback`: one `{"id", "index", "label"}` or `{"feedback": [...]}`.

        Raises:
            NotFound: an id not in the prediction log (404); ServingError: a bad item or class (400).
        """
        if self.loop is None:
            raise NotFound(
                "this service keeps no prediction log (serve.log_sample is 0); feedback has nowhere to go"
            )
        if isinstance(body, dict) and "feedback" in body:
            items = body["feedback"]
            if not isinstance(items, list) or not items:
                raise ServingError('"feedback" must be a non-empty list of {"id", "index", "label"}')
            return {"feedback": self.loop.feedback(items)}
        return self.loop.feedback([body])[0]

    def monitoring(self, name: str) -> dict[str, Any]:
        """`GET /v1/models/{name}/monitoring`: live quality per version, and the shadow comparison."""
        self._check_name(name)
        if self.loop is None:
            raise NotFound("this service keeps no prediction log (serve.log_sample is 0): no live figures")
        return self.loop.monitoring(self.served())

    @contextmanager
    def _on_the_way(self) -> Iterator[None]:
        """Count a request as arriving while it is read and checked (the batcher waits for it)."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def observe_request(self, endpoint: str, status: int, version: str | None, seconds: float) -> None:
        """Count one answered request (called by the HTTP layer for every response)."""
        self.metrics.requests.labels(endpoint, str(status), version or "").inc()
        self.metrics.request_seconds.labels(endpoint).observe(seconds)


def wait_ready(service: ModelService, timeout: float) -> None:
    """Block until the service is ready, or raise NotReady with its reason after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not service.ready()[0]:
        if time.monotonic() > deadline:
            raise NotReady(service.ready()[1])
        time.sleep(0.1)
