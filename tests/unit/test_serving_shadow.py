"""The shadow scorer without a model: it works only while no request is handled, and sheds, counted."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.serving import shadow
from pipeline.serving.shadow import ShadowJob, ShadowScorer


def job(images: int, ran: list[str], name: str) -> ShadowJob:
    finished = threading.Event()

    def done(outputs: str) -> None:
        ran.append(outputs)
        finished.set()

    item = ShadowJob(images, lambda: name, done)
    item.finished = finished  # type: ignore[attr-defined]
    return item


def test_a_job_waits_until_no_request_is_being_handled():
    skipped: list[int] = []
    scorer = ShadowScorer(10, skipped.append)
    ran: list[str] = []
    scorer.request_started()
    waiting = job(1, ran, "a")
    assert scorer.submit(waiting)
    time.sleep(0.3)
    assert ran == []  # a client is being answered: the challenger waits
    scorer.request_finished()
    assert waiting.finished.wait(5) and ran == ["a"]  # type: ignore[attr-defined]
    scorer.close()
    assert skipped == []


def test_over_the_limit_a_job_is_skipped_and_counted():
    skipped: list[int] = []
    scorer = ShadowScorer(3, skipped.append)
    scorer.request_started()
    ran: list[str] = []
    assert scorer.submit(job(2, ran, "a"))
    assert not scorer.submit(job(2, ran, "b"))  # 4 images would wait
    assert skipped == [2]
    scorer.request_finished()
    scorer.close()


def test_a_job_that_never_saw_an_idle_moment_is_dropped_and_counted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(shadow, "MAX_WAIT_SECONDS", 0.2)
    skipped: list[int] = []
    scorer = ShadowScorer(10, skipped.append)
    scorer.request_started()  # saturated: never idle
    ran: list[str] = []
    scorer.submit(job(3, ran, "a"))
    deadline = time.monotonic() + 5
    while not skipped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert skipped == [3] and ran == []
    scorer.request_finished()
    scorer.close()


def test_a_failing_challenger_is_counted_and_the_scorer_goes_on():
    skipped: list[int] = []
    scorer = ShadowScorer(10, skipped.append)

    def fail() -> str:
        raise RuntimeError("broken challenger")

    scorer.submit(ShadowJob(2, fail, lambda _: None))
    ran: list[str] = []
    after = job(1, ran, "b")
    scorer.submit(after)
    assert after.finished.wait(5) and ran == ["b"] and skipped == [2]  # type: ignore[attr-defined]
    scorer.close()
