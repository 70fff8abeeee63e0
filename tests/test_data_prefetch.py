"""Prefetcher: a producer thread a bounded queue ahead of its consumer, with errors and early stops handed
across. Real threads and real sleeps (time.sleep releases the GIL as native decoding does)."""
import gc
import threading
import time

import pytest

from m2clip_fast.data.errors import VideoDecodeError
from m2clip_fast.data.prefetch import Prefetcher


def _wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_items_arrive_in_order_and_the_thread_ends():
    feeder = Prefetcher(iter(range(50)), 2)
    assert list(feeder) == list(range(50))
    assert not feeder.running
    assert list(feeder) == []  # one pass only


def test_the_producer_stays_at_most_depth_items_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    feeder = Prefetcher(items(), 3)
    assert _wait_for(lambda: feeder.ready() == 3)
    time.sleep(0.2)  # room for a producer that would run ahead
    assert feeder.ready() == 3 and len(produced) <= 4  # 3 queued, at most one more waiting for room
    assert next(feeder) == 0
    assert _wait_for(lambda: feeder.ready() == 3) and len(produced) <= 5
    feeder.close()
    assert not feeder.running


def test_an_error_in_the_producer_reaches_the_consumer_at_its_item():
    def items():
        yield "a"
        yield "b"
        raise VideoDecodeError("/data/clip.mp4", "truncated")

    feeder = Prefetcher(items(), 2)
    assert next(feeder) == "a" and next(feeder) == "b"
    with pytest.raises(VideoDecodeError) as info:
        next(feeder)
    assert str(info.value) == "cannot decode /data/clip.mp4: truncated"
    assert info.value.path == "/data/clip.mp4"
    assert not feeder.running
    with pytest.raises(StopIteration):
        next(feeder)


def test_setup_runs_on_the_producer_thread_first():
    seen = {}

    def setup():
        seen["setup"] = threading.current_thread().name

    def items():
        seen["items"] = threading.current_thread().name
        yield 1

    assert list(Prefetcher(items(), 2, setup=setup, name="feeder-x")) == [1]
    assert seen == {"setup": "feeder-x", "items": "feeder-x"}


@pytest.mark.parametrize("how", ["close", "drop"])
def test_stopping_early_ends_the_thread_and_runs_the_producers_cleanup(how):
    cleaned = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    feeder = Prefetcher(items(), 2)
    assert next(feeder) == 0
    thread = feeder._thread
    if how == "close":
        feeder.close()
        assert not thread.is_alive()
    else:  # forgotten without close: garbage collection stops it
        del feeder
        gc.collect()
    assert cleaned.wait(5) and _wait_for(lambda: not thread.is_alive())


def test_a_slow_consumer_overlaps_a_slow_producer():
    """Producer p s per item, consumer c s per item, n items: about n * max(p, c), not n * (p + c)."""
    p = c = 0.05
    n = 10

    def items():
        for i in range(n):
            time.sleep(p)
            yield i

    start = time.perf_counter()
    for _ in Prefetcher(items(), 2):
        time.sleep(c)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.75 * n * (p + c), elapsed  # overlapped: ~0.55 s; in turn: 1.0 s


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(iter(()), 0)
