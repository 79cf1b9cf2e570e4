"""Shadow scoring: the challenger scores a share of `stable`'s requests with the capacity left over.

A shadowed request is queued after its client has the champion's answer. One
thread scores the queue, one request at a time, only once no prediction
request has been handled for `SETTLE_SECONDS`: the challenger's work does not
compete with a client for the cores. Under sustained load there is no idle moment, so the queue
fills (`serve.max_shadow_images`) and new requests are not shadowed, and a
request that waited `MAX_WAIT_SECONDS` is dropped; both are counted in
`serving_shadow_skipped_images_total`, so the shadow share actually scored is
visible. The A/B figures then rest on fewer images, never on slower clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 30.0  # a shadow request not scored by then is dropped (the service was never idle)
IDLE_POLL_SECONDS = 0.05  # how often a waiting scorer looks again when no notification came
SETTLE_SECONDS = 0.002  # idle this long first: a client's next request often follows its answer at once


@dataclass
class ShadowJob:
    """One shadowed request: the challenger's model call and what to do with its outputs."""

    images: int
    score: Callable[[], Any]
    done: Callable[[Any], None]
    queued: float = field(default_factory=time.monotonic)


class ShadowScorer:
    """Runs shadow jobs in one thread while the service is idle.

    Args:
        max_images: images waiting at once; a job that would exceed it is skipped.
        skipped: called with the image count of each job skipped or dropped.
    """

    def __init__(self, max_images: int, skipped: Callable[[int], None]) -> None:
        self.max_images = max_images
        self.skipped = skipped
        self._jobs: deque[ShadowJob] = deque()
        self._waiting = 0
        self._busy = 0  # prediction requests being handled now
        self._idle_since = time.monotonic()
        self._condition = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._thread.start()

    def submit(self, job: ShadowJob) -> bool:
        """Queue a job; False (and counted as skipped) when `max_images` are already waiting."""
        with self._condition:
            if self._waiting + job.images > self.max_images:
                self.skipped(job.images)
                return False
            self._jobs.append(job)
            self._waiting += job.images
            self._condition.notify()
        return True

    def request_started(self) -> None:
        with self._condition:
            self._busy += 1

    def request_finished(self) -> None:
        with self._condition:
            self._busy -= 1
            if self._busy == 0:
                self._idle_since = time.monotonic()
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._stop = True
            self._condition.notify()
        self._thread.join(timeout=30)

    def _next(self) -> ShadowJob | None:
        """The next job once the service is idle (None when stopping); expired jobs are dropped."""
        with self._condition:
            while not self._stop:
                while self._jobs and time.monotonic() - self._jobs[0].queued > MAX_WAIT_SECONDS:
                    dropped = self._jobs.popleft()
                    self._waiting -= dropped.images
                    self.skipped(dropped.images)
                idle = time.monotonic() - self._idle_since if self._busy == 0 else -1.0
                if self._jobs and idle >= SETTLE_SECONDS:
                    job = self._jobs.popleft()
                    self._waiting -= job.images
                    return job
                self._condition.wait(
                    SETTLE_SECONDS - idle if 0 <= idle < SETTLE_SECONDS else IDLE_POLL_SECONDS
                )
        return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                outputs = job.score()
            except Exception as error:
                self.skipped(job.images)
                log.warning("shadow scoring failed: %s", error)
                continue
            try:
                job.done(outputs)
            except Exception:
                log.exception("recording a shadow answer failed")
