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
from concurrent.futures import Future
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
    ) -> None:
        self._arriving = arriving or (lambda: 1)
        self._call = call
        self.max_batch_size = max_batch_size
        self.timeout = timeout_ms / 1000.0
        self._observe = observe or (lambda images, requests, seconds: None)
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

    def run(self, images: list[bytes]) -> Outputs:
        """The outputs for `images`, computed alone or in a shared batch; blocks until done."""
        return self.submit(images).result()

    def submit(self, images: list[bytes]) -> Future[Outputs]:
        """Queue `images`; the future holds their rows of the outputs (or the model's exception)."""
        future: Future[Outputs] = Future()
        with self._lock:
            queued = self._worker is not None and not self._closed
            if queued:
                self._queue.put(_Pending(images, future))
        if not queued:
            self._run_alone(images, future)
        return future

    def _run_alone(self, images: list[bytes], future: Future[Outputs]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._call(images)
        except Exception as error:  # handed to the request, which turns it into its answer
            future.set_exception(error)
            return
        self._observe(len(images), 1, time.perf_counter() - started)
        future.set_result(outputs)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, size = [first], len(first.images)
            deadline = time.monotonic() + self.timeout
            while size < self.max_batch_size:
                if self._queue.empty() and self._arriving() <= 0:
                    break  # nobody else is coming: waiting would only add latency
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if item is None:  # closing: finish this batch, then stop
                    self._queue.put(None)
                    break
                if size + len(item.images) > self.max_batch_size:
                    self._run([item])  # too big to join: on its own, before the batch waits longer
                    continue
                batch.append(item)
                size += len(item.images)
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
        self._observe(len(images), len(batch), time.perf_counter() - started)
        for item, part in zip(batch, _split(outputs, [len(i.images) for i in batch]), strict=True):
            item.future.set_result(part)

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
