"""Micro-batching: concurrent requests share one model call, as TF Serving's batching does.

A request's images join a queue; one worker thread per model version takes
the first waiting request, then keeps taking requests until the batch holds
`max_batch_size` images or `timeout_ms` has passed since that first request,
calls the model once on all of them, and hands each request its rows. It
waits only while other requests are on their way (`arriving`: being read and
checked, not yet queued), so a lone request is not delayed by the timeout. A
timeout of 0 turns batching off: every request calls the model on its own, in
its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
ModelCall = Callable[[list[bytes]], Outputs]
BatchObserver = Callable[[int, int, float], None]  # (images, requests, seconds) of one model call


@dataclass
class _Pending:
    images: list[bytes]
    future: Future[Outputs]
    pixels: int = 0


def _settle(
    future: Future[Outputs], result: Outputs | None = None, error: BaseException | None = None
) -> None:
    """Hand a request its answer, unless it was cancelled (its client went away) meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:  # cancelled, or settled, in between
        log.debug("a request's answer was dropped: it was cancelled")


def _split(outputs: Outputs, sizes: list[int]) -> list[Outputs]:
    parts, start = [], 0
    for size in sizes:
        parts.append({key: value[start : start + size] for key, value in outputs.items()})
        start += size
    return parts


class Batcher:
    """Runs a model call on requests, batching concurrent ones.

    Args:
        call: the model on a list of encoded images; returns arrays with one row per image.
        max_batch_size: images in one call (a single larger request still runs whole).
        max_batch_pixels: decoded pixels in one call (the images' width x height summed), so that
            large images are not decoded 32 at a time; a request over it runs alone.
        timeout_ms: how long the first request of a batch waits for others; 0 disables batching.
        observe: called after each model call with its images, requests and seconds.
        name: for the worker thread's name.
        arriving: how many requests are on their way to `submit` now (None: always wait).
    """

    def __init__(
        self,
        call: ModelCall,
        max_batch_size: int,
        timeout_ms: float,
        observe: BatchObserver | None = None,
        name: str = "model",
        arriving: Callable[[], int] | None = None,
        max_batch_pixels: int | None = None,
    ) -> None:
        self.max_batch_pixels = max_batch_pixels or 2**62
        self._arriving = arriving or (lambda: 1)
        self._call = call
        self.max_batch_size = max_batch_size
        self.timeout = timeout_ms / 1000.0
        self._observe = observe or (lambda images, requests, seconds: None)
        self._name = name
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # a request is queued before the closing marker, or runs alone
        self._worker: threading.Thread | None = None
        if self.timeout > 0:
            self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
            self._worker.start()

    @property
    def enabled(self) -> bool:
        return self._worker is not None

    def run(self, images: list[bytes], pixels: int = 0) -> Outputs:
        """The outputs for `images`, computed alone or in a shared batch; blocks until done."""
        return self.submit(images, pixels).result()

    def submit(self, images: list[bytes], pixels: int = 0) -> Future[Outputs]:
        """Queue `images` (`pixels` decoded pixels in all); the future holds their rows of the outputs.

        The future fails with the model's exception when the call fails.
        """
        future: Future[Outputs] = Future()
        with self._lock:
            queued = self._worker is not None and not self._closed
            if queued:
                self._queue.put(_Pending(images, future, pixels))
        if not queued:
            self._run_alone(images, future)
        return future

    def _run_alone(self, images: list[bytes], future: Future[Outputs]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._call(images)
        except Exception as error:  # handed to the request, which turns it into its answer
            _settle(future, error=error)
            return
        self._safely_observe(len(images), 1, time.perf_counter() - started)
        _settle(future, outputs)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            try:
                self._collect_and_run(first)
            except Exception:  # never let the worker die: every later request would wait forever
                log.exception("the batcher of %s failed collecting a batch (a bug)", self._name)

    def _collect_and_run(self, first: _Pending) -> None:
        batch, size, pixels = [first], len(first.images), first.pixels
        deadline = time.monotonic() + self.timeout
        while size < self.max_batch_size and pixels < self.max_batch_pixels:
            if self._queue.empty() and self._arriving() <= 0:
                break  # nobody else is coming: waiting would only add latency
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            if size + len(item.images) > self.max_batch_size or pixels + item.pixels > self.max_batch_pixels:
                self._run([item])  # too big to join: on its own, before the batch waits longer
                continue
            batch.append(item)
            size += len(item.images)
            pixels += item.pixels
        self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0].images, batch[0].future)
            return
        images = [image for item in batch for image in item.images]
        started = time.perf_counter()
        try:
            outputs = self._call(images)
        except Exception:
            # One request's image may fail the shared call: give each request its own answer.
            for item in batch:
                self._run_alone(item.images, item.future)
            return
        self._safely_observe(len(images), len(batch), time.perf_counter() - started)
        for item, part in zip(batch, _split(outputs, [len(i.images) for i in batch]), strict=True):
            _settle(item.future, part)

    def _safely_observe(self, images: int, requests: int, seconds: float) -> None:
        try:
            self._observe(images, requests, seconds)
        except Exception:  # metrics must never cost a request its answer
            log.exception("observing a model call failed")

    def close(self) -> None:
        """Finish what is queued, then stop the worker; later requests run alone. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._worker is not None:
                self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)
