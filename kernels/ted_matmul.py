"""Triton up-projection of the TED-Adapter with the bias/residual epilogue fused:

  out[m] = residual[m] + S[m]·W_upᵀ + b_ue + [token(m) is a patch]·b_ud,   W_up = [W_ue | W_ud]

One GEMM (K = 2r) replaces up_e and up_d, and the epilogue saves the passes an unfused version
makes over the (M, C) output (two bias adds, a row-masked add, the residual add).

Why the stencil is NOT fused into the A-operand load (bytes model, ViT-B/16, 8 clips × 8 frames:
M = 12,608 rows, K = 2r = 768, N = C = 768, bf16, H100 SXM):
  * materialised S (ted_stencil.py): the stencil streams Z in and S out, 2 × 19.4 MB ≈ 39 MB of
    HBM ≈ 13 µs at ~3 TB/s; this GEMM then reads S like any A operand, staged into shared memory
    by the software pipeline straight to wgmma (15 GFLOP ≈ 25 µs at ~600 TFLOP/s).
  * fused: every A element would be rebuilt from 3 (E half) or 18 (D half, 9 taps × 2 frames)
    shifted Z loads, i.e. 10.5 loads on average, by EVERY one of the N / BLOCK_N = 6 column-tile
    programs that need it: 63 × 2 B × 9.7 M A elements ≈ 1.2 GB through L1/L2 instead of 0.12 GB,
    ≈ 60 µs even at ~20 TB/s of aggregate L1/L2 bandwidth (vs the 13 µs above, and the GEMM is
    then load-bound: ~60 µs against ~38 µs for stencil + GEMM), and the operand has to pass
    through registers for the arithmetic, which stalls the MMA pipeline.  Recompute only pays if one
    program owned all N columns; a 64 × 768 fp32 accumulator (192 KB) does not fit an SM's
    256 KB register file next to the operand tiles.
So S is written once (cost ~13 µs) and this kernel keeps only the epilogue fusion.
The down GEMM stays torch.addmm (cuBLAS): its only epilogue is the E-half bias, which cuBLAS
fuses itself, and nothing else can join it — the stencil needs Z rows ±L and ±w away, which
live in other output tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ted_stencil import INTERPRETED, launch_device


def _operand_class(dtype: torch.dtype, input_precision: str) -> str:
    """Which tile list a launch draws from: 16-bit operands, fp32 on TF32 tensor cores, or fp32 FMA."""
    if dtype.itemsize == 2:
        return "16bit"
    return "tf32" if input_precision == "tf32" else "ieee"


def _tiles():
    """Autotune configs per operand class, for K = 2r ∈ [256, 1024] and N = C ∈ {512, 768, 1024};
    64-row tiles cover small batches (M = B·T·197 is a few thousand).

    Each list was compiled for sm_90a and sm_80 with Triton's ptxas (tests/test_kernels_aot.py,
    k400 shapes): none spills and all fit both targets' shared memory (227 / 163 KB per block).
    * 16bit: wgmma on sm_90, mma.sync on sm_80; 96–255 registers, ≤ 128 KB shared. 128×256
      (8 warps) and 128×128 (4 warps) were dropped: 255 registers and ~0.8 KB/thread of spills
      (bf16, s3, both targets).
    * tf32: the 16-bit tiles at BLOCK_K = 32, i.e. the same shared-memory bytes per stage; at
      BLOCK_K = 64, 128×128 s4 (256 KB) and 64×256 s3 (240 KB) exceed an H100 block, and
      128×128 s4 (192 KB) an A100 one.
      96–254 registers, ≤ 128 KB.
    * ieee: plain-fp32 dots run on FMA units, with the operand fragments in registers; at
      BLOCK_K = 64 every tile spilled on sm_80 (0.6–5.9 KB/thread) and 128×128 on sm_90 (8 B).
      BLOCK_K = 16: 104–254 registers, ≤ 32 KB.
    """
    cfg = lambda bm, bn, bk, w, s: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    tensor_core = ((128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4),
                   (64, 64, 4, 4))
    return {
        "16bit": [cfg(bm, bn, 64, w, s) for bm, bn, w, s in tensor_core],
        "tf32": [cfg(bm, bn, 32, w, s) for bm, bn, w, s in tensor_core],
        "ieee": [cfg(bm, bn, 16, w, 3) for bm, bn, w in ((128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4))],
    }


def _configs(interpreted: bool):
    if interpreted:  # the interpreter's autotuner accepts a single config only
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [c for tiles in _TILES.values() for c in tiles]


_TILES = _tiles()


def _prune_to_operands(configs, named_args, **kwargs):
    """The autotuner's early prune: keep the configs of this launch's operand class (see _tiles)."""
    tiles = _TILES[_operand_class(named_args["a_ptr"].dtype, kwargs["INPUT_PRECISION"])]
    return [c for c in configs if any(c is t for t in tiles)]


@triton.jit
def _ted_up_kernel(
    a_ptr, b_ptr, res_ptr, out_ptr, bias_e_ptr, bias_d_ptr,
    M, N, K, L, M_BUCKET,
    stride_am, stride_bk, stride_rm, stride_rn, stride_om,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles sweep all column tiles together, so W_up (small)
    # and a band of S stay in L2 while the band is consumed.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            # Interpreter only: its dot multiplies bf16 bit patterns as integers. fp16/bf16 → fp32
            # is exact and products of two such values are exact in fp32, so this matches a
            # tensor-core dot with fp32 accumulation up to summation order.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    tok = rm % L
    bias_e = tl.load(bias_e_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    bias_d = tl.load(bias_d_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    mask = m_ok[:, None] & n_ok[None, :]
    res = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0)
    acc += bias_e[None, :] + tl.where((tok > 0)[:, None], bias_d[None, :], 0.0) + res.to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# Tuned per (N, K) and a power-of-two bucket of M: M = B·T·L changes with every partial batch and
# evaluation view, and a full sweep per new M would stall each of them.
# INPUT_PRECISION is in the key because it selects the tile list (the dtypes are keyed anyway).
_ted_up_kernel_tuned = triton.autotune(configs=_configs(INTERPRETED), key=["M_BUCKET", "N", "K", "INPUT_PRECISION"],
                                       prune_configs_by={"early_config_prune": _prune_to_operands})(_ted_up_kernel)


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch's CUDA fp32 matmuls may use TF32, read through whichever API set it.

    From torch 2.9 reading the legacy ``allow_tf32`` raises once the new ``fp32_precision`` API was
    used; the new API reports legacy settings too, so it is read first.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":  # not set for matmul: the global setting applies
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def ted_up_projection(s: torch.Tensor, w_up_t: torch.Tensor, residual: torch.Tensor,
                      bias_e: torch.Tensor, bias_d: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """residual + s·w_up_t + bias_e + [row % tokens_per_frame ≠ 0]·bias_d.

    s: (M, K) row-major; w_up_t: (K, N) row-major, same dtype as s (the caller casts parameters);
    residual: (M, N) in s's dtype, any strides; biases: (N,) in any float dtype (added in fp32).
    """
    m, k = s.shape
    n = w_up_t.shape[1]
    if w_up_t.shape[0] != k or residual.shape != (m, n) or bias_e.shape != (n,) or bias_d.shape != (n,):
        raise ValueError(f"shape mismatch: S {tuple(s.shape)}, W_upᵀ {tuple(w_up_t.shape)}, "
                         f"residual {tuple(residual.shape)}, biases {tuple(bias_e.shape)}/{tuple(bias_d.shape)}")
    if s.stride(1) != 1 or w_up_t.stride(1) != 1:
        raise ValueError("S and W_upᵀ must be row-major (unit stride along the last dimension)")
    if residual.dtype != s.dtype or w_up_t.dtype != s.dtype:
        raise TypeError(f"dtypes differ: S {s.dtype}, W_upᵀ {w_up_t.dtype}, residual {residual.dtype}")
    out = torch.empty((m, n), device=s.device, dtype=s.dtype)
    # fp32 inputs follow torch's matmul policy, so the Triton and cuBLAS halves of the op agree.
    precision = "tf32" if s.dtype == torch.float32 and s.is_cuda and fp32_matmul_uses_tf32() else "ieee"
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with launch_device(s):
        _ted_up_kernel_tuned[grid](
            s, w_up_t, residual, out, bias_e.contiguous(), bias_d.contiguous(),  # the kernel reads unit stride
            m, n, k, tokens_per_frame, triton.next_power_of_2(m),
            s.stride(0), w_up_t.stride(0), residual.stride(0), residual.stride(1), out.stride(0),
            UPCAST=INTERPRETED, INPUT_PRECISION=precision,
        )
    return out
