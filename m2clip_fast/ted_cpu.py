"""Fused TED adapter for CPU: two GEMMs forward, four backward, one C++ stencil pass each way.

The E and D down projections share one GEMM because down_d(x_t − x_{t−1}) = Z_t − Z_{t−1} + b_d with
Z = x·W_dᵀ, so the frame difference moves onto the r-wide Z instead of the C-wide x, and the stencil
(``m2clip_fast._C``) applies b_e, b_d, both depthwise convs and the class-row mask in one pass while
also writing ``residual + up biases`` into the output buffer that the up GEMM then accumulates into.
Only x and a compact copy of Z's patch rows are saved (exactly half of what the eager adapter keeps):
Z's class rows, x's class rows times W_e, are a GEMM of B·T rows that the backward recomputes. (The
copy costs less than writing the patch rows directly: a GEMM batched over frames is 2× slower in bf16
on oneDNN.) S = [S_e | S_d] is recomputed by the backward stencil, which in the same pass
produces dZ, every conv / bias gradient, the up-bias sums of the incoming gradient and, when the
residual is x itself, dx's initial value g (so dx = g + dZ·W_down is one in-place GEMM).

The r-wide temporaries (S, dS, dZ) and the packed weights live in a per-thread workspace that is
reused across calls: on Linux a fresh multi-MB tensor is faulted in page by page, which costs more
than the stencil itself. ``release_workspace()`` frees it.

bf16: with bfloat16 inputs, or under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the GEMMs run
in bf16 (MKL/oneDNN accumulate in fp32) and the stencil accumulates in fp32; the output keeps the
dtype of ``residual`` like the reference's ``residual + update``.

ISA: the stencil runs the best variant this CPU supports (AVX-512, AVX2+FMA or the baseline build).
``M2CLIP_STENCIL_ISA=best|avx512|avx2|baseline``, read when this module is imported, pins one, e.g. to
test every variant on one machine; a name this CPU (or this build) cannot run raises ``StencilISAError``
at that import rather than silently running another variant.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .adapters import check_kernel_params

ABI_VERSION = 2  # must equal _C.ABI_VERSION (csrc/bindings.cpp): the kernels' signatures changed with it


def stale_extension(module) -> Optional[str]:
    """Why an imported ``_C`` cannot serve this code (built from older sources), or None.

    An editable install whose Python was updated without a rebuild would otherwise fail on its first
    call with pybind's wall of printed tensors; instead the reference path runs and the notice says why.
    """
    built = getattr(module, "ABI_VERSION", 1)
    if built == ABI_VERSION:
        return None
    return (f"it is out of date (ABI {built}, this code needs {ABI_VERSION}); "
            f"rebuild with `pip install --no-build-isolation -e .`")


try:
    from m2clip_fast import _C
    _IMPORT_ERROR: Optional[BaseException] = None
    _stale = stale_extension(_C)
    if _stale is not None:
        _C, _IMPORT_ERROR = None, ImportError(_stale)
except ImportError as exc:  # not built (no compiler at install time, or M2CLIP_NO_EXT=1)
    _C = None
    _IMPORT_ERROR = exc

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
STENCIL_ISA_ENV = "M2CLIP_STENCIL_ISA"


class StencilISAError(ValueError):
    """M2CLIP_STENCIL_ISA names a stencil variant that this CPU or this build cannot run."""


def apply_stencil_isa_from_env(environ=os.environ) -> None:
    """Pin the C++ stencil to ``environ[M2CLIP_STENCIL_ISA]`` when it is set (and not empty)."""
    name = environ.get(STENCIL_ISA_ENV, "").strip()
    if not name:
        return
    if _C is None:
        raise StencilISAError(f"{STENCIL_ISA_ENV}={name} is set, but the C++ stencil is unavailable: {_IMPORT_ERROR}")
    try:
        _C.set_stencil_isa(name)
    except RuntimeError as exc:  # unknown name, or an ISA this CPU lacks: the message says which
        raise StencilISAError(f"{STENCIL_ISA_ENV}={name}: {str(exc).splitlines()[0]}") from None


apply_stencil_isa_from_env()


class _Workspace(threading.local):
    """Scratch tensors that never escape a forward or backward call, one set per thread."""

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's cached scratch tensors (about 3 · B·T·L · 2r elements plus the packed weights)."""
    _WORKSPACE.buffers.clear()


def _packed(name: str, parts, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[W_e; W_d] (dim 0) or [W_ue | W_ud] (dim 1) in the GEMM dtype, written into the workspace.

    The copies run on this thread (``_C.copy_serial_``): a 2 MB torch.cat is an OpenMP region whose
    wake-up alone costs milliseconds when other processes share the cores.
    """
    a, b = parts
    shape = (a.shape[0] + b.shape[0], a.shape[1]) if dim == 0 else (a.shape[0], a.shape[1] + b.shape[1])
    out = _WORKSPACE.get(name, shape, dtype)
    first, second = (out[: a.shape[0]], out[a.shape[0]:]) if dim == 0 else (out[:, : a.shape[1]], out[:, a.shape[1]:])
    _C.copy_serial_(first, a.detach())
    _C.copy_serial_(second, b.detach())
    return out


def _column_halves(t: torch.Tensor, r: int, dtype: torch.dtype):
    """Contiguous copies of t[:, :r] and t[:, r:] (autograd would clone the strided views in parallel)."""
    halves = []
    for part in (t[:, :r], t[:, r:]):
        dst = torch.empty(part.shape, dtype=dtype)
        _C.copy_serial_(dst, part)
        halves.append(dst)
    return halves


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: bf16 under CPU bf16 autocast, else x's own dtype."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return x.dtype


def supports(x: torch.Tensor) -> Optional[str]:
    """None if the fused CPU path can run on x, else the reason it cannot."""
    if _C is None:
        return f"m2clip_fast._C is not built ({_IMPORT_ERROR})"
    if x.device.type != "cpu":
        return f"tensor is on {x.device}, not the CPU"
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return f"CPU autocast to {torch.get_autocast_dtype('cpu')} (only bfloat16 is fused)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (fused: float32, bfloat16)"
    return None


def _check(x: torch.Tensor, residual: torch.Tensor, weights: Tuple[torch.Tensor, ...], num_frames: int,
           h: int, w: int) -> None:
    reason = supports(x)
    if reason is not None:
        raise RuntimeError(f"ted_adapter_cpu cannot run: {reason}")
    if x.dim() != 3 or x.shape[1] != 1 + h * w:
        raise ValueError(f"x must be (B*T, 1+h*w, C) with h*w = {h}*{w}, got {tuple(x.shape)}")
    if num_frames < 1 or x.shape[0] % num_frames:
        raise ValueError(f"batch dimension {x.shape[0]} is not a multiple of num_frames={num_frames}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    params = dict(zip(("down_e_w", "conv_e_w", "up_e_w", "down_d_w", "conv_d_w", "up_d_w"), weights))
    c = params["down_e_w"].shape[-1]
    check_kernel_params(params, c, "the fused kernel covers kernel size 3 only")
    if c != x.shape[2]:
        raise ValueError(f"down_e_w expects C={c}, tokens have C={x.shape[2]}")


def _class_rows_e(xg: torch.Tensor, w_down: torch.Tensor, tokens: int) -> torch.Tensor:
    """Z's class rows, E half: x's class rows · W_eᵀ, (B·T, r). xg: (B·T·L, C); w_down: packed (2r, C)."""
    frames, r = xg.shape[0] // tokens, w_down.shape[0] // 2
    x_class = xg.view(frames, tokens, xg.shape[1])[:, 0]
    return torch.mm(x_class, w_down[:r].t(), out=_WORKSPACE.get("z_class", (frames, r), xg.dtype))


class TEDAdapterCPUFunction(torch.autograd.Function):
    """Autograd node of the fused CPU adapter; saves x (in the GEMM dtype) and Z's patch rows, nothing else.

    ``residual=None`` means the residual is x itself: its gradient g is then folded into dx inside
    the dx GEMM instead of autograd adding two C-sized tensors afterwards.
    """

    @staticmethod
    def forward(ctx, x, residual, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b, down_d_w, down_d_b,
                conv_d_w, conv_d_b, up_d_w, up_d_b, num_frames, h, w, dtype, for_backward):
        channels = x.shape[-1]
        with torch.autocast("cpu", enabled=False):
            x2 = x.reshape(-1, channels).contiguous()
            res2 = x2 if residual is None else residual.reshape(-1, channels).contiguous()
            xg = x2.to(dtype)
            full = (x2.shape[0], 2 * down_e_w.shape[0])
            z = torch.mm(xg, _packed("w_down", (down_e_w, down_d_w), 0, dtype).t(), out=_WORKSPACE.get("z", full, dtype))
            s, out = _C.ted_stencil_forward(z, None, res2, down_e_b, conv_e_w, conv_e_b, down_d_b, conv_d_w, conv_d_b,
                                            up_e_b, up_d_b, num_frames, h, w, _WORKSPACE.get("s", full, dtype))
            w_up = _packed("w_up", (up_e_w, up_d_w), 1, dtype)
            if out.dtype == dtype:
                torch.addmm(out, s, w_up.t(), out=out)
            else:  # fp32 residual under bf16 autocast: ATen has no bf16 × bf16 → fp32 GEMM on CPU
                out += torch.mm(s, w_up.t())
        if for_backward:
            z_patch = z.view(-1, 1 + h * w, full[1])[:, 1:].reshape(-1, full[1])  # a copy: z is scratch
            ctx.save_for_backward(xg, z_patch, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, down_d_w, down_d_b,
                                  conv_d_w, conv_d_b, up_d_w)
            ctx.geometry = (num_frames, h, w)
            ctx.residual_is_x = residual is None
            ctx.x_dtype = x.dtype
            ctx.up_bias_dtypes = (up_e_b.dtype, up_d_b.dtype)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (xg, z, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, down_d_w, down_d_b, conv_d_w, conv_d_b,
         up_d_w) = ctx.saved_tensors
        need = ctx.needs_input_grad
        dtype, r, channels = z.dtype, down_e_w.shape[0], grad_out.shape[-1]
        num_frames, h, w = ctx.geometry
        with torch.autocast("cpu", enabled=False):
            g = grad_out.reshape(-1, channels).contiguous()
            gg = g.to(dtype)
            w_down = _packed("w_down", (down_e_w, down_d_w), 0, dtype)
            z_class = _class_rows_e(xg, w_down, 1 + h * w)
            full = (g.shape[0], 2 * r)
            ds = torch.mm(gg, _packed("w_up", (up_e_w, up_d_w), 1, dtype), out=_WORKSPACE.get("ds", full, dtype))
            fold = ctx.residual_is_x and need[0] and g.dtype == dtype
            (s, dz, d_conv_e_w, d_conv_e_b, d_down_e_b, d_conv_d_w, d_conv_d_b, d_down_d_b, d_up_e_b, d_up_d_b,
             dx) = _C.ted_stencil_backward(z, z_class, ds, g, down_e_b, conv_e_w, conv_e_b, down_d_b, conv_d_w,
                                           conv_d_b, num_frames, h, w, fold, _WORKSPACE.get("s", full, dtype),
                                           _WORKSPACE.get("dz", full, dtype))
            d_up_e_w = d_up_d_w = d_down_e_w = d_down_d_w = None
            if need[6] or need[12]:
                d_up_e_w, d_up_d_w = _column_halves(torch.mm(gg.t(), s), r, up_e_w.dtype)
            if need[0]:
                if fold:
                    torch.addmm(dx, dz, w_down, out=dx)
                else:
                    dx = torch.mm(dz, w_down).to(ctx.x_dtype)
                    if ctx.residual_is_x:
                        dx = dx + g
                dx = dx.view(grad_out.shape)
            else:
                dx = None
            if need[2] or need[8]:
                d_down = torch.mm(dz.t(), xg)
                d_down_e_w, d_down_d_w = d_down[:r], d_down[r:]
        d_residual = grad_out if need[1] else None

        def cast(grad, like):
            return None if grad is None else grad.to(like if isinstance(like, torch.dtype) else like.dtype)

        up_e_b_dtype, up_d_b_dtype = ctx.up_bias_dtypes
        return (dx, d_residual, cast(d_down_e_w, down_e_w), cast(d_down_e_b, down_e_b), cast(d_conv_e_w, conv_e_w),
                cast(d_conv_e_b, conv_e_b), cast(d_up_e_w, up_e_w), cast(d_up_e_b, up_e_b_dtype),
                cast(d_down_d_w, down_d_w), cast(d_down_d_b, down_d_b), cast(d_conv_d_w, conv_d_w),
                cast(d_conv_d_b, conv_d_b), cast(d_up_d_w, up_d_w), cast(d_up_d_b, up_d_b_dtype),
                None, None, None, None, None)


def ted_adapter_cpu(x, residual, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b, down_d_w, down_d_b,
                    conv_d_w, conv_d_b, up_d_w, up_d_b, num_frames: int, h: int, w: int) -> torch.Tensor:
    """out = residual + E(x) + [0; D(x)] (see ``TEDAdapter``) with the fused CPU kernels.

    x, residual: (B·T, 1+h·w, C), same dtype (float32 or bfloat16); ``residual`` may be x itself.
    Weights as in ``TEDAdapter``'s state_dict, kernel size 3. bf16 GEMMs with bf16 x or under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``. Differentiable once (no double backward).
    """
    if residual is None:
        residual = x
    _check(x, residual, (down_e_w, conv_e_w, up_e_w, down_d_w, conv_d_w, up_d_w), num_frames, h, w)
    tensors = (x, residual, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b, down_d_w, down_d_b, conv_d_w,
               conv_d_b, up_d_w, up_d_b)
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return TEDAdapterCPUFunction.apply(
        x, None if residual is x else residual, *tensors[2:], num_frames, h, w, compute_dtype(x), for_backward)
