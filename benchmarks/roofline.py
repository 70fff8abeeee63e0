"""Roofline MODEL of the TED adapter at the paper's shape in bf16, with the H100 floor of each variant.

    python benchmarks/roofline.py

This is a model, not a measurement. Every kernel is assumed to read each input and write each
output exactly once from HBM (no reuse across kernels, perfect reuse inside one), elementwise and
layout ops included; the eager variants are modelled op by op as their code runs under autograd,
the fused variant as the repository's design (one down GEMM, one stencil pass, one up GEMM with a
residual/bias epilogue; backward: four GEMMs and one stencil pass, S recomputed, only x and Z
saved). Parameters are counted where a kernel reads or writes them. H100 SXM: 3.35 TB/s HBM3,
~989 TFLOP/s dense bf16; a variant's floor is max(bytes / bandwidth, FLOPs / peak).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

B, T, H, W, C, R = 2, 8, 14, 14, 768, 384
L = 1 + H * W
M, MP = B * T * L, B * T * H * W  # all tokens, patch tokens
ELEM = 2  # bf16
HBM_BPS, PEAK_FLOPS = 3.35e12, 989e12


@dataclass
class Trace:
    """Kernels of one pass as (name, elements read, elements written, FLOPs)."""
    kernels: List[Tuple[str, int, int, int]] = field(default_factory=list)

    def op(self, name: str, read: int, write: int, flops: int = 0) -> None:
        self.kernels.append((name, read, write, flops))

    @property
    def bytes(self) -> int:
        return sum(r + w for _, r, w, _ in self.kernels) * ELEM

    @property
    def flops(self) -> int:
        return sum(f for *_, f in self.kernels)


def linear(fwd: Trace, bwd: Trace, rows: int, cin: int, cout: int, name: str) -> None:
    """addmm forward; backward dX = dY·W, dW = dYᵀ·X, db = Σ dY (three kernels, as autograd runs them)."""
    fwd.op(f"{name} GEMM", rows * cin + cin * cout + cout, rows * cout, 2 * rows * cin * cout)
    bwd.op(f"{name} dX GEMM", rows * cout + cin * cout, rows * cin, 2 * rows * cin * cout)
    bwd.op(f"{name} dW GEMM", rows * cout + rows * cin, cin * cout, 2 * rows * cin * cout)
    bwd.op(f"{name} db sum", rows * cout, cout, rows * cout)


def copy(fwd: Trace, bwd: Trace, n: int, name: str) -> None:
    """A permute/reshape that materialises (.contiguous()); its backward is the inverse copy."""
    fwd.op(name, n, n)
    bwd.op(f"{name} (grad)", n, n)


def dwconv(fwd: Trace, bwd: Trace, n: int, taps: int, name: str) -> None:
    """Depthwise conv over n elements: backward reads grad + input, writes grad input and weight grad."""
    fwd.op(name, n, n, 2 * taps * n)
    bwd.op(f"{name} dX", n, n, 2 * taps * n)
    bwd.op(f"{name} dW", 2 * n, 0, 2 * taps * n)


def branch(fwd: Trace, bwd: Trace, rows: int, taps: int, names: Tuple[str, ...]) -> None:
    """down linear → a materialised permute → depthwise conv → the permutes back → up linear."""
    down, conv, up, before, *after = names
    linear(fwd, bwd, rows, C, R, down)
    copy(fwd, bwd, rows * R, before)
    dwconv(fwd, bwd, rows * R, taps, conv)
    for name in after:
        copy(fwd, bwd, rows * R, name)
    linear(fwd, bwd, rows, R, C, up)


def eager_reference() -> Tuple[Trace, Trace]:
    fwd, bwd = Trace(), Trace()
    branch(fwd, bwd, M, 3, ("down_e", "conv_e", "up_e", "E to (B·L, r, T)", "E back to tokens"))
    fwd.op("previous frames (cat)", MP * C, MP * C)
    fwd.op("frame difference (sub)", 2 * MP * C, MP * C)
    bwd.op("difference grad: neg + slice-adds into x", 3 * MP * C, 2 * MP * C + M * C)
    branch(fwd, bwd, MP, 9, ("down_d", "conv_d", "up_d", "D to (BT, r, h, w)", "D back to tokens (up_d input)"))
    fwd.op("pad class row", MP * C, M * C)
    bwd.op("pad grad (slice copy)", MP * C, MP * C)
    fwd.op("E + D update", 2 * M * C, M * C)
    fwd.op("residual add", 2 * M * C, M * C)
    bwd.op("dx = g + dx_E + dx_D", 4 * M * C, 2 * M * C)
    return fwd, bwd


def official_style() -> Tuple[Trace, Trace]:
    fwd, bwd = Trace(), Trace()
    fwd.op("previous frames (gather)", MP * C, MP * C)
    fwd.op("frame difference (sub)", 2 * MP * C, MP * C)
    bwd.op("difference grad: neg, index_add, slice into x", 4 * MP * C, 3 * MP * C + M * C)
    branch(fwd, bwd, MP, 9, ("offset fc1", "Conv3d (1,3,3)", "offset fc2", "permute(0,4,1,2,3).contiguous()",
                             "permute(0,2,3,4,1).contiguous()"))
    branch(fwd, bwd, M, 3, ("fc1", "Conv1d over T", "fc2", "permute(0,2,3,1).contiguous()",
                            "permute(0,2,1).contiguous()", "permute(0,2,1,3).contiguous()"))
    fwd.op("residual + E", 2 * M * C, M * C)
    fwd.op("patch rows + D", 2 * MP * C, MP * C)
    fwd.op("cat class row", M * C, M * C)
    bwd.op("cat grad slices (copies)", M * C, M * C)
    bwd.op("dx = g + dx_E + dx_D", 4 * M * C, 2 * M * C)
    return fwd, bwd


def fused() -> Tuple[Trace, Trace]:
    fwd, bwd = Trace(), Trace()
    stencil_flops = M * R * 2 * 3 + MP * R * (2 * 9 + 2)
    fwd.op("down GEMM Z = x·[W_e; W_d]ᵀ", M * C + 2 * R * C, M * 2 * R, 2 * M * C * 2 * R)
    fwd.op("stencil Z → S", M * 2 * R, M * 2 * R, stencil_flops)
    fwd.op("up GEMM + bias/residual epilogue", M * 2 * R + 2 * R * C + M * C, M * C, 2 * M * 2 * R * C)
    bwd.op("dS = g·W_up", M * C + 2 * R * C, M * 2 * R, 2 * M * 2 * R * C)
    bwd.op("stencil bwd: S, dZ, conv/bias grads, Σg", 2 * M * 2 * R + M * C, 2 * M * 2 * R, 3 * stencil_flops)
    bwd.op("dW_up = gᵀ·S", M * C + M * 2 * R, 2 * R * C, 2 * M * 2 * R * C)
    bwd.op("dx = g + dZ·W_down", M * 2 * R + 2 * R * C + M * C, M * C, 2 * M * 2 * R * C)
    bwd.op("dW_down = dZᵀ·x", M * 2 * R + M * C, 2 * R * C, 2 * M * 2 * R * C)
    return fwd, bwd


def floor_us(trace_bytes: int, trace_flops: int) -> Tuple[float, float, float]:
    mem, compute = trace_bytes / HBM_BPS * 1e6, trace_flops / PEAK_FLOPS * 1e6
    return mem, compute, max(mem, compute)


def report() -> str:
    lines = [
        f"MODEL (not a measurement): TED adapter {B}x{T}x{L}x{C}, r={R}, bf16; H100 SXM floor = "
        f"max(bytes / {HBM_BPS / 1e12:.2f} TB/s, FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s)",
        f"{'variant':22s} {'pass':8s} {'kernels':>7s} {'MB moved':>9s} {'GFLOP':>7s} {'mem us':>7s} "
        f"{'math us':>8s} {'floor us':>9s} {'bound':>7s}",
    ]
    for name, build in (("eager reference", eager_reference), ("official-style eager", official_style),
                        ("fused", fused)):
        fwd, bwd = build()
        both = Trace(fwd.kernels + bwd.kernels)
        for label, trace in (("fwd", fwd), ("fwd+bwd", both)):
            mem, compute, floor = floor_us(trace.bytes, trace.flops)
            bound = "memory" if mem >= compute else "compute"
            lines.append(f"{name:22s} {label:8s} {len(trace.kernels):7d} {trace.bytes / 1e6:9.1f} "
                         f"{trace.flops / 1e9:7.2f} {mem:7.1f} {compute:8.1f} {floor:9.1f} {bound:>7s}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
