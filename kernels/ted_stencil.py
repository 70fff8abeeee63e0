"""Triton stencil of the TED-Adapter bottleneck: one pass over Z = x·[W_e; W_d]ᵀ (+ [b_e; 0]).

Z is (M, 2r), M = B·T·L rows (clip b, frame t, token l at row (b·T + t)·L + l), channels
contiguous: columns [0, r) are the E half, [r, 2r) the D half. Per channel c:

  S_e[m] = bias_e + Σ_k w_e[k] · Z_e[m + (k−1)·L]                  (neighbour frames, zero padded)
  Y[m]   = Z_d[m] − Z_d[m − L] + b_d   (t ≥ 1),   b_d   (t = 0)       (= down_d(x_t − x_{t−1}))
  S_d[m] = bias_d + Σ_{i,j} w_d[i,j] · Y[m + (i−1)·w + (j−1)]       (patch rows; 3×3 grid, zero padded)
  S_d[class row] = 0

Both directions share one kernel. Forward writes S. Backward, given dS = g·W_up, writes
dZ (dZ_e = conv_Tᵀ dS_e; dZ_d,t = dY_t·[t ≥ 1] − dY_{t+1} with dY = conv3×3ᵀ dS_d) and, because it
already walks the Z neighbourhood for the conv-weight gradients, re-emits S for dW_up = gᵀ·S at
the cost of a store — cheaper than a second pass that re-reads Z. Per-channel parameter gradients
(conv_e w/b, b_e, conv_d w/b, b_d) are reduced over rows inside each program and written as
per-program partials: deterministic, no atomics, one tiny torch sum afterwards.

Launch grid: axis 0 walks row blocks, axis 1 channel blocks of the E half then of the D half
(one half per program keeps registers low, see the kernel). A (BLOCK_M × BLOCK_R) tile reads
channel-contiguous rows (coalesced), and every neighbour tap is the same tile shifted by a whole
number of rows (±L for frames, ±1/±w inside the grid), so the 3 + 18 taps of a tile hit L1/L2
after the first touch: the kernel streams Z (and dS) from HBM about once. Axis 0 is the fastest
launch axis, so programs resident together work on neighbouring rows and share those taps in L2.
All arithmetic is fp32; fp16/bf16 values are cast on load (bf16 arithmetic is also wrong in the
Triton interpreter, so this is what makes the CPU tests meaningful).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Rows of the (16, r) per-program gradient partials; shared by the kernel and the host reduction.
_SLOT_CONV_E_W: tl.constexpr = tl.constexpr(0)  # 3 taps
_SLOT_CONV_E_B: tl.constexpr = tl.constexpr(3)
_SLOT_DOWN_E_B: tl.constexpr = tl.constexpr(4)
_SLOT_CONV_D_W: tl.constexpr = tl.constexpr(5)  # 9 taps
_SLOT_CONV_D_B: tl.constexpr = tl.constexpr(14)
_SLOT_DOWN_D_B: tl.constexpr = tl.constexpr(15)
_NUM_SLOTS: tl.constexpr = tl.constexpr(16)

# Backward row programs: enough (with the channel blocks) to fill an H100's 132 SMs a few times
# over, few enough that the fp32 partials (P × 16 × r) stay ~3 MB at r = 384 — small next to the
# ~19 MB of Z it reads for a ViT-B/16 batch of 8 clips × 8 frames.
_MAX_BWD_ROW_PROGRAMS = 128


def launch_device(t: torch.Tensor):
    """Context in which a Triton launch on t's tensors runs: Triton uses the *current* CUDA device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward_configs(interpreted: bool):
    # Multiple configs break the interpreter's autotuner; there one mid-sized tile keeps the
    # number of (slow, Python-level) program instances low while still exercising masking.
    if interpreted:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_R": 16}, num_warps=4)]
    # Memory-bound stencil: 64–128 channels × 2 B per row segment = one or two full 128-B lines
    # per warp load. Per-thread footprint from compiling for sm_90a and sm_80 with ptxas
    # (tests/test_kernels_aot.py): 60–105 registers for fp16/bf16, 73–121 for fp32, no spills.
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_R": 64}, num_warps=8),
        triton.Config({"BLOCK_M": 16, "BLOCK_R": 128}, num_warps=8),
        triton.Config({"BLOCK_M": 64, "BLOCK_R": 64}, num_warps=8),
        triton.Config({"BLOCK_M": 32, "BLOCK_R": 128}, num_warps=8),
    ]


@triton.jit
def _tap(ptr, rows, shift, col0, chans, ok, chan_ok, stride):
    """fp32 values of ptr[rows + shift, col0 + chans] where ok (per row), 0 elsewhere."""
    src = (rows + shift).to(tl.int64)
    mask = ok[:, None] & chan_ok[None, :]
    vals = tl.load(ptr + src[:, None] * stride + col0 + chans[None, :], mask=mask, other=0.0)
    return vals.to(tl.float32)


@triton.jit
def _grid_ok(ok, gi, gj, di, dj, H, W):
    """ok & (gi + di, gj + dj) lies on the h×w grid."""
    ni = gi + di
    nj = gj + dj
    return ok & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)


@triton.jit
def _diff_tap(z_ptr, rows, t, gi, gj, patch_ok, chans, chan_ok, bias_dd, L, H, W, R, stride, DI, DJ):
    """Y at grid neighbour (DI−1, DJ−1) of every row: Z_d,t − Z_d,t−1 + b_d (b_d at t = 0), 0 off-grid."""
    inside = _grid_ok(patch_ok, gi, gj, DI - 1, DJ - 1, H, W)
    shift = (DI - 1) * W + (DJ - 1)  # row-major grid: a neighbour is a fixed row offset, same frame
    has_prev = inside & (t > 0)
    cur = _tap(z_ptr, rows, shift, R, chans, has_prev, chan_ok, stride)
    prev = _tap(z_ptr, rows, shift - L, R, chans, has_prev, chan_ok, stride)
    return tl.where(inside[:, None], cur - prev + bias_dd[None, :], 0.0)


@triton.jit
def _conv3x3_transposed(ds_ptr, rows, gi, gj, ok, chans, chan_ok, wd_ptr, H, W, R, stride):
    """dY of every row: Σ_{i,j} w_d[i,j] · dS_d at grid neighbour (1−i, 1−j), same frame."""
    acc = tl.zeros((rows.shape[0], chans.shape[0]), dtype=tl.float32)
    for tap in range(9):
        di = tap // 3
        dj = tap - di * 3
        inside = _grid_ok(ok, gi, gj, 1 - di, 1 - dj, H, W)
        ds = _tap(ds_ptr, rows, (1 - di) * W + (1 - dj), R, chans, inside, chan_ok, stride)
        wk = tl.load(wd_ptr + chans * 9 + tap, mask=chan_ok, other=0.0).to(tl.float32)
        acc += wk[None, :] * ds
    return acc


@triton.jit
def _slot(acc, slots, k, per_chan):
    return acc + tl.where(slots[:, None] == k, per_chan[None, :], 0.0)


@triton.jit
def _e_half(z_ptr, ds_ptr, s_ptr, dz_ptr, acc, slots, rows, row_ok, t, chans, chan_ok, we_ptr, bce_ptr,
            R, L, T, stride, BACKWARD: tl.constexpr, WRITE_S: tl.constexpr):
    """One row block of the E half: S_e = conv_T(Z_e) + bias; backward adds dZ_e and its partials."""
    bias = tl.load(bce_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    s_e = tl.zeros((rows.shape[0], chans.shape[0]), dtype=tl.float32) + bias[None, :]
    if BACKWARD:
        ds_e = _tap(ds_ptr, rows, 0, 0, chans, row_ok, chan_ok, stride)
        dz_e = tl.zeros((rows.shape[0], chans.shape[0]), dtype=tl.float32)
    for k in tl.static_range(3):
        wk = tl.load(we_ptr + chans * 3 + k, mask=chan_ok, other=0.0).to(tl.float32)
        z_k = _tap(z_ptr, rows, (k - 1) * L, 0, chans, row_ok & (t + (k - 1) >= 0) & (t + (k - 1) < T),
                   chan_ok, stride)
        s_e += wk[None, :] * z_k
        if BACKWARD:
            acc = _slot(acc, slots, _SLOT_CONV_E_W + k, tl.sum(ds_e * z_k, axis=0))
            ds_k = _tap(ds_ptr, rows, (1 - k) * L, 0, chans, row_ok & (t + (1 - k) >= 0) & (t + (1 - k) < T),
                        chan_ok, stride)
            dz_e += wk[None, :] * ds_k
    offs = rows.to(tl.int64)[:, None] * stride + chans[None, :]
    mask = row_ok[:, None] & chan_ok[None, :]
    if WRITE_S:
        tl.store(s_ptr + offs, s_e.to(s_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        tl.store(dz_ptr + offs, dz_e.to(dz_ptr.dtype.element_ty), mask=mask)
        acc = _slot(acc, slots, _SLOT_CONV_E_B, tl.sum(ds_e, axis=0))
        acc = _slot(acc, slots, _SLOT_DOWN_E_B, tl.sum(dz_e, axis=0))
    return acc


@triton.jit
def _d_half(z_ptr, ds_ptr, s_ptr, dz_ptr, acc, slots, rows, row_ok, t, tok, chans, chan_ok,
            wd_ptr, bcd_ptr, bdd_ptr, R, L, T, H, W, stride, BACKWARD: tl.constexpr, WRITE_S: tl.constexpr):
    """One row block of the D half: S_d = conv3×3(Y) + bias on patch rows, 0 on class rows."""
    is_patch = tok > 0
    patch_ok = row_ok & is_patch
    p = tl.where(is_patch, tok - 1, 0)  # keep // on non-negatives (C and numpy round negatives apart)
    gi = p // W
    gj = p - gi * W
    bias_cd = tl.load(bcd_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    bias_dd = tl.load(bdd_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    s_d = tl.zeros((rows.shape[0], chans.shape[0]), dtype=tl.float32) + bias_cd[None, :]
    if BACKWARD:
        ds_d = _tap(ds_ptr, rows, 0, R, chans, patch_ok, chan_ok, stride)
    # A runtime loop, not static_range: unrolled, the compiler hoists all 18 tap loads and their
    # 64-bit addresses (backward, bf16, sm_90a, 32×64 tile, 8 warps: 255 registers and 32 B/thread
    # of spills, 72 B at 64×64; 141 registers rolled); rolled, the other resident warps keep
    # enough loads in flight.
    for tap in range(9):
        wk = tl.load(wd_ptr + chans * 9 + tap, mask=chan_ok, other=0.0).to(tl.float32)
        y = _diff_tap(z_ptr, rows, t, gi, gj, patch_ok, chans, chan_ok, bias_dd, L, H, W, R, stride,
                      tap // 3, tap % 3)
        s_d += wk[None, :] * y
        if BACKWARD:
            acc = _slot(acc, slots, _SLOT_CONV_D_W + tap, tl.sum(ds_d * y, axis=0))
    offs = rows.to(tl.int64)[:, None] * stride + R + chans[None, :]
    mask = row_ok[:, None] & chan_ok[None, :]
    if WRITE_S:
        tl.store(s_ptr + offs, tl.where(is_patch[:, None], s_d, 0.0).to(s_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        # Y_t depends on Z_t (+) and Z_{t−1} (−); Y_0 = b_d depends on no Z at all.
        dy_t = _conv3x3_transposed(ds_ptr, rows, gi, gj, patch_ok, chans, chan_ok, wd_ptr, H, W, R, stride)
        dy_next = _conv3x3_transposed(ds_ptr, rows + L, gi, gj, patch_ok & (t + 1 < T), chans, chan_ok,
                                      wd_ptr, H, W, R, stride)
        dz_d = tl.where((t > 0)[:, None], dy_t, 0.0) - dy_next
        tl.store(dz_ptr + offs, dz_d.to(dz_ptr.dtype.element_ty), mask=mask)
        acc = _slot(acc, slots, _SLOT_CONV_D_B, tl.sum(ds_d, axis=0))
        acc = _slot(acc, slots, _SLOT_DOWN_D_B, tl.sum(dy_t, axis=0))
    return acc


# The backward's one tile, not autotuned: its gradient sums are grouped by the tile and the warp
# layout, so a per-process tuning choice would make two runs (or a run and its resume) differ in
# the last bits. Compiled for sm_90a and sm_80 (tests/test_kernels_aot.py), 32×64 at 8 warps
# spilled (fp32 24–40 B/thread, fp16 without S 48 B, on sm_90a) or took up to 160 registers
# (fp16 with S), at which only one 8-warp block fits an SM's 64 K registers; at 16 warps: 100–128
# registers, no spills, and one 16-warp block per SM: twice the warps in flight for the tap loads.
_BACKWARD_TILE = {"BLOCK_M": 32, "BLOCK_R": 64, "num_warps": 16}


@triton.jit
def _ted_stencil_kernel(
    z_ptr, ds_ptr, s_ptr, dz_ptr, part_ptr,
    we_ptr, bce_ptr, wd_ptr, bcd_ptr, bdd_ptr,
    M, R, L, T, H, W,
    BACKWARD: tl.constexpr, WRITE_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Axis 1 holds the E channel blocks, then the D channel blocks: a program runs one half only,
    # so registers are sized by the larger half rather than by both, and more resident warps hide
    # the tap loads.
    pid_m = tl.program_id(0)
    blocks_r = tl.cdiv(R, BLOCK_R)
    is_d = tl.program_id(1) >= blocks_r
    chans = (tl.program_id(1) - blocks_r * is_d.to(tl.int32)) * BLOCK_R + tl.arange(0, BLOCK_R)
    chan_ok = chans < R
    stride = 2 * R
    slots = tl.arange(0, _NUM_SLOTS)
    acc = tl.zeros((_NUM_SLOTS, BLOCK_R), dtype=tl.float32)

    # Grid-stride over row blocks: the forward launches one program per block; the backward
    # launches fewer, so each keeps its gradient partials in registers across blocks.
    for blk in range(pid_m, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        frame = rows // L
        tok = rows - frame * L
        t = frame % T
        if is_d:
            acc = _d_half(z_ptr, ds_ptr, s_ptr, dz_ptr, acc, slots, rows, row_ok, t, tok, chans, chan_ok,
                          wd_ptr, bcd_ptr, bdd_ptr, R, L, T, H, W, stride, BACKWARD, WRITE_S)
        else:
            acc = _e_half(z_ptr, ds_ptr, s_ptr, dz_ptr, acc, slots, rows, row_ok, t, chans, chan_ok, we_ptr, bce_ptr,
                          R, L, T, stride, BACKWARD, WRITE_S)

    if BACKWARD:
        # The E and D programs of a channel block share its partial rows: each writes only its
        # own slots (E: 0‥4, D: 5‥15), or the later store would zero the other's sums.
        own = (slots >= _SLOT_CONV_D_W) == is_d
        part_offs = (pid_m * _NUM_SLOTS + slots)[:, None].to(tl.int64) * R + chans[None, :]
        tl.store(part_ptr + part_offs, acc, mask=own[:, None] & chan_ok[None, :])


# Whether triton.jit built the kernels for the CPU interpreter (TRITON_INTERPRET=1 when this package
# was imported; ted_matmul's kernel is built in the same import); the autotuners' configs follow it.
INTERPRETED = isinstance(_ted_stencil_kernel, InterpretedFunction)
_ted_stencil_forward_kernel = triton.autotune(configs=_forward_configs(INTERPRETED), key=["R", "L", "T"])(
    _ted_stencil_kernel)


def _stencil_params(conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b):
    """fp32, contiguous (r,3) / (r,9) tap tables and biases: tiny, and the kernel accumulates in fp32."""
    r = conv_e_b.shape[0]
    return (conv_e_w.reshape(r, 3).float().contiguous(), conv_e_b.float().contiguous(),
            conv_d_w.reshape(r, 9).float().contiguous(), conv_d_b.float().contiguous(),
            down_d_b.float().contiguous())


def _check_z(z: torch.Tensor, frames: int, h: int, w: int) -> int:
    if z.dim() != 2 or z.shape[1] % 2 or not z.is_contiguous():
        raise ValueError(f"Z must be a contiguous (M, 2r) tensor, got shape {tuple(z.shape)}")
    length = 1 + h * w
    if z.shape[0] % (frames * length):
        raise ValueError(f"{z.shape[0]} rows are not a whole number of clips of {frames} × {length} tokens")
    return z.shape[1] // 2


def ted_stencil_forward(z: torch.Tensor, conv_e_w: torch.Tensor, conv_e_b: torch.Tensor,
                        conv_d_w: torch.Tensor, conv_d_b: torch.Tensor, down_d_b: torch.Tensor,
                        num_frames: int, h: int, w: int) -> torch.Tensor:
    """S = [conv_T(Z_e) + bias | conv3×3(frame-diff(Z_d) + b_d) + bias], same dtype and shape as Z."""
    r = _check_z(z, num_frames, h, w)
    params = _stencil_params(conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b)
    s = torch.empty_like(z)
    m = z.shape[0]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), 2 * triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
    # ds/dz/partials are never touched when BACKWARD is off; z stands in for the pointers.
    with launch_device(z):
        _ted_stencil_forward_kernel[grid](z, z, s, z, z, *params, m, r, 1 + h * w, num_frames, h, w,
                                          BACKWARD=False, WRITE_S=True)
    return s


def ted_stencil_backward(z: torch.Tensor, ds: torch.Tensor, conv_e_w: torch.Tensor, conv_e_b: torch.Tensor,
                         conv_d_w: torch.Tensor, conv_d_b: torch.Tensor, down_d_b: torch.Tensor,
                         num_frames: int, h: int, w: int, recompute_s: bool = True):
    """Backward of the stencil (and of the E bias, which lives in Z).

    Returns (dZ, S or None, grads) where dZ is Z-shaped (class rows of the D half zero) and grads
    is a dict of fp32 per-channel gradients: conv_e_w (r,3), conv_e_b, down_e_b, conv_d_w (r,9),
    conv_d_b, down_d_b (each (r,)).
    """
    r = _check_z(z, num_frames, h, w)
    if ds.shape != z.shape:
        raise ValueError(f"dS shape {tuple(ds.shape)} != Z shape {tuple(z.shape)}")
    ds = ds.contiguous()
    params = _stencil_params(conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b)
    m = z.shape[0]
    dz = torch.empty_like(z)
    s = torch.empty_like(z) if recompute_s else dz  # dz: a valid pointer never written through
    programs = max(1, min(triton.cdiv(m, 64), _MAX_BWD_ROW_PROGRAMS))
    partials = torch.empty((programs, _NUM_SLOTS.value, r), device=z.device, dtype=torch.float32)
    grid = (programs, 2 * triton.cdiv(r, _BACKWARD_TILE["BLOCK_R"]))
    with launch_device(z):
        _ted_stencil_kernel[grid](z, ds, s, dz, partials, *params, m, r, 1 + h * w, num_frames, h, w,
                                  BACKWARD=True, WRITE_S=recompute_s, **_BACKWARD_TILE)
    total = partials.sum(0)
    e_w, d_w = _SLOT_CONV_E_W.value, _SLOT_CONV_D_W.value
    grads = {
        "conv_e_w": total[e_w:e_w + 3].t(),
        "conv_e_b": total[_SLOT_CONV_E_B.value],
        "down_e_b": total[_SLOT_DOWN_E_B.value],
        "conv_d_w": total[d_w:d_w + 9].t(),
        "conv_d_b": total[_SLOT_CONV_D_B.value],
        "down_d_b": total[_SLOT_DOWN_D_B.value],
    }
    return dz, (s if recompute_s else None), grads
