"""Independent pieces of CPU work run side by side, one worker thread per core, instead of one after another
with every core on each op.

torch's intra-op parallelism splits every op over all threads and joins after it, so each GEMM, LayerNorm
and residual add of a forward pays a fork/join, and MKL's multi-threaded sgemm partitions one product
between the cores. Pieces that never mix (the clips of an inference batch) can instead go one per core,
each worker running torch with its share of the threads. On 2 Zen 3 cores, timed alone, (1576, 768) @
(768, 3072) fp32 ran at 109–120 GFLOP/s on 2 threads and at 136–139 GFLOP/s together as two single-threaded
products side by side (for 18,912 rows they were about even); k400_b16_8f's 12-view evaluation ran 1.10× faster
with its one-clip calls side by side than one after another on both threads (benchmarks/test_eval.py).

The workers inherit the caller's grad mode, inference mode and CPU autocast (all three are per thread in
torch); each computes its pieces in the same order as a serial loop would, so only GEMM blocking (rounding)
differs from running them here. torch has no per-thread-only thread count: while the workers run, the count
a new thread starts with is theirs, so a thread that first uses torch in that window (a loader's prefetch
thread started meanwhile) keeps it. One worker per thread is what was measured, on 2 cores; with more threads
than pieces, the threads left over (``threads % workers``) idle.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Sequence, TypeVar

import torch

Piece = TypeVar("Piece")
Result = TypeVar("Result")


def map_on_cores(fn: Callable[[Piece], Result], pieces: Sequence[Piece], workers: int) -> List[Result]:
    """``[fn(p) for p in pieces]``, computed by up to ``workers`` threads that each run torch on
    ``torch.get_num_threads() // workers`` intra-op threads. Pieces that would not give every worker one more
    (the last ``len(pieces) % workers``) run here afterwards, on all threads, rather than leave cores idle; so
    does everything with one worker or one piece. An exception in any piece (or Ctrl-C) is raised here once
    the pieces already running have finished; the pieces not yet started never run."""
    threads = torch.get_num_threads()
    workers = min(int(workers), len(pieces), threads)
    if workers <= 1:
        return [fn(p) for p in pieces]
    side_by_side = len(pieces) - len(pieces) % workers
    return _on_workers(fn, pieces[:side_by_side], workers, threads) + [fn(p) for p in pieces[side_by_side:]]


def _on_workers(fn, pieces, workers: int, threads: int) -> list:
    """Worker k computes pieces k, k + workers, ... (the pieces are alike: a fixed share balances them) on
    ``threads // workers`` threads; ``threads``: the caller's count, restored afterwards."""
    per_worker = threads // workers
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    amp, amp_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    results, errors, stop = [None] * len(pieces), [], threading.Event()

    def work(first: int) -> None:
        # Per thread: OpenMP's team size and MKL's thread count (torch.set_num_threads sets both for the
        # calling thread), grad mode, inference mode and autocast.
        torch.set_num_threads(per_worker)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
            for i in range(first, len(pieces), workers):
                if stop.is_set():
                    return
                try:
                    results[i] = fn(pieces[i])
                except BaseException as exc:  # handed to the caller, which raises it
                    errors.append(exc)
                    stop.set()
                    return

    team = [threading.Thread(target=work, args=(k,), name=f"m2clip-core_{k}", daemon=True) for k in range(workers)]
    try:
        try:
            for t in team:
                t.start()
            for t in team:
                t.join()
        except BaseException:  # Ctrl-C while waiting: the workers stop after the piece they are on
            stop.set()
            for t in team:
                if t.is_alive():
                    t.join()
            raise
    finally:
        # torch.set_num_threads also sets the count new threads start with; the caller's own is unchanged,
        # but threads it starts later must start with its count, not the workers'
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    return results
