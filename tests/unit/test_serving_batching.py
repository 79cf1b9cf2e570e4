"""The service's batcher and its command line, without a model: a plain function stands in for the call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.serving.batching import Batcher


def echo(calls: list[int]):
    """A model call that records its batch size and returns each image's length as its output."""

    def call(images: list[bytes]) -> dict[str, np.ndarray]:
        calls.append(len(images))
        time.sleep(0.01)
        return {"length": np.array([len(i) for i in images])}

    return call


def test_concurrent_requests_share_calls_and_each_gets_its_own_rows():
    calls: list[int] = []
    batcher = Batcher(echo(calls), max_batch_size=8, timeout_ms=50)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda n: batcher.run([b"x" * n]), range(1, 33)))
    batcher.close()
    assert [int(a["length"][0]) for a in answers] == list(range(1, 33))
    assert sum(calls) == 32 and len(calls) < 32 and max(calls) <= 8


def test_a_timeout_of_zero_runs_every_request_in_its_own_call():
    calls: list[int] = []
    batcher = Batcher(echo(calls), max_batch_size=8, timeout_ms=0)
    assert not batcher.enabled
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda n: batcher.run([b"x" * n, b"y"]), range(1, 17)))
    batcher.close()
    assert [[int(v) for v in a["length"]] for a in answers] == [[n, 1] for n in range(1, 17)]
    assert calls == [2] * 16  # the same concurrency that shares calls above, one call per request


def test_a_lone_request_does_not_wait_for_the_timeout():
    batcher = Batcher(echo([]), max_batch_size=8, timeout_ms=2000, arriving=lambda: 0)
    started = time.perf_counter()
    batcher.run([b"x"])
    batcher.close()
    assert time.perf_counter() - started < 1.0


def test_the_pixel_budget_keeps_large_requests_out_of_shared_calls():
    calls: list[int] = []
    batcher = Batcher(echo(calls), max_batch_size=32, timeout_ms=100, max_batch_pixels=100)
    futures = [batcher.submit([b"x"], pixels=60) for _ in range(6)]
    for future in futures:
        future.result(timeout=10)
    batcher.close()
    assert calls == [1] * 6  # 60 + 60 > 100: never two in one call


def test_a_cancelled_request_leaves_the_worker_serving_the_next():
    calls: list[int] = []
    gate = threading.Event()

    def slow(images: list[bytes]) -> dict[str, np.ndarray]:
        gate.wait(5)
        return echo(calls)(images)

    batcher = Batcher(slow, max_batch_size=4, timeout_ms=1)
    first = batcher.submit([b"a"])
    time.sleep(0.1)
    second = batcher.submit([b"bb"])
    assert second.cancel()  # its client went away while it waited
    gate.set()
    assert int(first.result(timeout=10)["length"][0]) == 1
    assert int(batcher.run([b"ccc"])["length"][0]) == 3  # the worker is alive
    batcher.close()


def test_a_failing_call_fails_only_the_requests_whose_images_fail():
    def picky(images: list[bytes]) -> dict[str, np.ndarray]:
        if b"bad" in images:
            raise ValueError("cannot decode")
        return {"length": np.array([len(i) for i in images])}

    batcher = Batcher(picky, max_batch_size=8, timeout_ms=100)
    good, bad = batcher.submit([b"good"]), batcher.submit([b"bad"])
    assert int(good.result(timeout=10)["length"][0]) == 4
    with pytest.raises(ValueError, match="cannot decode"):
        bad.result(timeout=10)
    batcher.close()


@pytest.mark.parametrize("flag", [["--max-batch-size", "0"], ["--poll-seconds", "0"], ["--workers", "0"]])
def test_out_of_range_options_stop_the_service_at_start_naming_the_setting(flag, capsys):
    from serving.__main__ import main

    assert main(flag) == 2
    assert flag[0].removeprefix("--").replace("-", "_") in capsys.readouterr().err
