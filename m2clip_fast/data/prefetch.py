"""Produce an iterator's items on a background thread, up to ``depth`` items ahead of the consumer.

The DALI loader runs its pipeline here, so that decoding the next batches overlaps the training step on the
batch at hand. Decoding happens in DALI's (and FFmpeg's) native code, which releases the GIL, so one Python
thread is enough. An exception the producer raises reaches the consumer unchanged (type, message, traceback)
at the place of the item that failed. Closing the consumer's side (:meth:`Prefetcher.close`, dropping the
prefetcher, the interpreter's exit) stops and joins the producer; its thread is a daemon, and holds no
reference to the prefetcher, so that neither a forgotten prefetcher nor the exit waits on it.
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Callable, Generic, Iterator, Optional, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)
_POLL_S = 0.05  # how often a blocked side checks whether the other has gone
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


def _put(q: "queue.Queue", stop: threading.Event, entry) -> bool:
    """Queue ``entry``, waiting for room; False when the consumer stopped meanwhile."""
    while not stop.is_set():
        try:
            q.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _produce(items: Iterator, q: "queue.Queue", stop: threading.Event, setup: Optional[Callable[[], None]]):
    try:
        if setup is not None:
            setup()
        for item in items:
            if not _put(q, stop, (_ITEM, item)):
                return
        _put(q, stop, (_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        _put(q, stop, (_ERROR, exc))
    finally:
        close = getattr(items, "close", None)
        if close is not None:  # a generator's own cleanup (its finally blocks) runs on this thread
            close()


class Prefetcher(Generic[T]):
    """Iterate ``items`` on a daemon thread, keeping at most ``depth`` produced items queued.

    ``setup`` runs first on that thread (e.g. ``torch.cuda.set_device``: the current device is per thread).
    Iterate the prefetcher once; call :meth:`close` (or use it as a context manager) when stopping early.
    """

    def __init__(self, items: Iterator[T], depth: int, *, setup: Optional[Callable[[], None]] = None,
                 name: str = "prefetch"):
        self._stop = threading.Event()
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.depth = depth
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(items, self._queue, self._stop, setup),
                                        name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def ready(self) -> int:
        """How many produced items wait for the consumer now (at most ``depth``)."""
        with self._queue.mutex:
            return sum(kind == _ITEM for kind, _ in self._queue.queue)

    @property
    def running(self) -> bool:
        """Whether the producer thread is still alive."""
        return self._thread.is_alive()

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the producer and wait for its thread (it finishes the item in hand); the rest is dropped."""
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room, in case the producer waits to put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL_S)
        with self._queue.mutex:
            self._queue.queue.clear()

    def __del__(self):
        self._stop.set()  # without joining: the thread sees it within _POLL_S and ends

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for prefetcher in list(_LIVE):
        prefetcher.close()
