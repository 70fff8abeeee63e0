"""What the machine can do, measured in the benchmark's own process: FLOPs of a piece of work
(torch.utils.flop_counter) and the throughput torch.mm reaches on one GEMM shape, so a benchmark can
print its achieved FLOP/s as a fraction of the GEMM throughput of the same machine, threads and dtype.

The flop counter counts matrix products, convolutions and attention only (elementwise work, norms,
the C++ adapter stencil and the optimizer count zero): achieved FLOP/s is the useful matrix work per
second, and 1.0 would mean the whole step ran at the speed of one large GEMM.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs one forward convolution, groups
    included: the weight (C_out, C_in / groups, *k) already carries them. PyTorch's own formula ignores
    groups, and counts a depthwise conv's backward at C_in times its cost (the TED adapter's depthwise convs:
    11.1 GFLOP instead of 0.06 per 2x8 clips)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# Formulas PyTorch's counter lacks or gets wrong here. It has formulas for the CUDA attention kernels only;
# on the CPU sdpa (ours, and nn.MultiheadAttention with need_weights=False) runs the two below, which it
# would count as zero. And its convolution_backward ignores groups (see _conv_backward).
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    torch.ops.aten.convolution_backward: _conv_backward,
}


@dataclass
class FlopCount:
    """FLOPs of one run, in total and by ATen op name (e.g. {"addmm": ..., "_scaled_dot_product_...": ...})."""
    total: int
    by_op: Dict[str, int]

    @property
    def gemm_share(self) -> float:
        """Fraction of the counted FLOPs that are plain matrix products (mm/addmm/bmm/baddbmm)."""
        gemm = sum(v for k, v in self.by_op.items() if k in GEMM_OPS)
        return gemm / self.total if self.total else 0.0


def count_flops(run: Callable[[], object]) -> FlopCount:
    """FLOPs of everything ``run()`` dispatches (forward and, if it calls backward, backward too)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with counter:
        run()
    by_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(total=int(counter.get_total_flops()), by_op=by_op)


def _gemm_operands(rows: int, inner: int, cols: int, dtype: torch.dtype, device: str = "cpu"):
    """The same random (rows, inner) input and (cols, inner) nn.Linear-layout weight for every GEMM timing."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(cols, inner, generator=gen).to(device=device, dtype=dtype)
    return a, w


def _best_flops_per_s(run: Callable[[], object], flops: int, repeats: int, sync: Callable[[], None]) -> float:
    """``flops`` / the best of ``repeats`` timed ``run()`` calls after one warm-up (page faults, MKL's buffers).
    The best run: on a shared machine other processes only ever add time."""
    best = float("inf")
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        run()
        sync()
        if i:
            best = min(best, time.perf_counter() - start)
    return flops / best


def gemm_flops_per_s(rows: int, inner: int, cols: int, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", repeats: int = 10) -> float:
    """Best FLOP/s of torch.mm (rows, inner) × (inner, cols) over ``repeats`` timed runs after one warm-up,
    the right operand laid out as an nn.Linear weight (cols, inner) transposed, as the model's layers use it."""
    a, w = _gemm_operands(rows, inner, cols, dtype, device)
    out = torch.empty(rows, cols, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return _best_flops_per_s(lambda: torch.mm(a, w.t(), out=out), 2 * rows * inner * cols, repeats, sync)


def gemm_flops_per_s_on_cores(rows: int, inner: int, cols: int, dtype: torch.dtype = torch.float32,
                              repeats: int = 10) -> float:
    """Best FLOP/s of the same product on the CPU split by rows into one single-threaded torch.mm per thread,
    run side by side (m2clip_fast.cpu_workers.map_on_cores, as CPU inference runs its chunks): what the cores
    reach when each runs its own GEMM (on 2 Zen 3 cores: faster than one two-thread GEMM at 1576 rows, even at
    18,912)."""
    from m2clip_fast.cpu_workers import map_on_cores

    threads = torch.get_num_threads()
    a, w = _gemm_operands(rows, inner, cols, dtype)
    pieces = a.chunk(threads)
    outs = [torch.empty(len(p), cols, dtype=dtype) for p in pieces]

    def side_by_side():
        map_on_cores(lambda k: torch.mm(pieces[k], w.t(), out=outs[k]), range(len(pieces)), threads)

    return _best_flops_per_s(side_by_side, 2 * rows * inner * cols, repeats, lambda: None)


def cell(value: Optional[float], fmt: str) -> str:
    """A benchmark table's cell: ``value`` in ``fmt``, or "-" right-aligned to the format's width when None."""
    return format(value, fmt) if value is not None else format("-", ">" + column_width(fmt))


def column_width(fmt: str) -> str:
    """The width part of a format spec: "8.2f" → "8", "6d" → "6"."""
    return fmt.rstrip("defs").split(".")[0]
