"""TED-Adapter forward/backward on Triton: two GEMMs forward, four backward, one stencil pass each way.

The difference branch never materialises x_t − x_{t−1}: down_d is linear, so
down_d(x_t − x_{t−1}) = Z_d,t − Z_d,t−1 + b_d with Z_d = x·W_dᵀ, and both branches share one down GEMM
Z = x·[W_e; W_d]ᵀ (+ [b_e; 0]). The stencil kernel turns Z into S = [S_e | S_d]; one up GEMM with
a fused epilogue adds the biases and the residual.

Backward saves only x (alive anyway in the residual stream) and Z; S is re-emitted by the
stencil backward kernel, which reads the same Z neighbourhood for the conv-weight gradients.
Parameter tensors are saved too, but they are leaves that live regardless, so they cost nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from ..adapters import check_kernel_params, token_layout

try:
    from . import ted_matmul, ted_stencil
    _IMPORT_ERROR = None
except ImportError as exc:  # no Triton: callers check triton_available() and use the reference path
    ted_matmul = ted_stencil = None
    _IMPORT_ERROR = exc

_PARAM_NAMES = ("down_e_w", "down_e_b", "conv_e_w", "conv_e_b", "up_e_w", "up_e_b",
                "down_d_w", "down_d_b", "conv_d_w", "conv_d_b", "up_d_w", "up_d_b")


def _kernels_interpreted() -> bool:
    """Whether the kernels can run in Triton's CPU interpreter in this process.

    Triton picks interpreter vs compiler when a function is decorated, reading TRITON_INTERPRET at
    that moment — for our kernels at import of this package, and for triton.language's own jit
    helpers (tl.sum, tl.zeros, ...) at ``import triton``. Both must have seen the flag: setting it
    after triton was imported (open_clip imports it) leaves compiled helpers that the interpreter
    refuses to call.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return ted_stencil.INTERPRETED and isinstance(tl.sum, InterpretedFunction)


def triton_available() -> bool:
    """True when the Triton path can run: Triton importable, and either CUDA present or the kernels
    (and triton itself) built for the CPU interpreter, i.e. TRITON_INTERPRET=1 was set before
    triton was first imported."""
    if _IMPORT_ERROR is not None:
        return False
    if torch.cuda.is_available():
        return True
    return _kernels_interpreted()


@contextlib.contextmanager
def _kernel_scope(t: torch.Tensor):
    # Triton launches on the current CUDA device; tensors on another GPU need it switched.
    # Autocast is off inside: precision follows x.dtype (the Triton GEMM requires matching
    # operand dtypes), where autocast would turn the cuBLAS GEMMs' outputs bf16 under fp32 x.
    with ted_stencil.launch_device(t):
        with torch.autocast(device_type=t.device.type, enabled=False):
            yield


def _check_params(c: int, p: dict) -> int:
    return check_kernel_params(p, c, "kernels are k = 3 temporal and 3×3 spatial")


class TEDTritonFunction(torch.autograd.Function):
    """out = residual + E(x) + [0; D(x)]; arguments as :func:`ted_adapter_triton`."""

    @staticmethod
    def forward(ctx, x, residual, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b,
                down_d_w, down_d_b, conv_d_w, conv_d_b, up_d_w, up_d_b, num_frames, h, w):
        bt, length, c = x.shape
        m = bt * length
        r = down_e_w.shape[0]
        dt = x.dtype
        with _kernel_scope(x):
            x2d = x.reshape(m, c).contiguous()
            w_down = torch.cat([down_e_w, down_d_w]).to(dt)
            b_down = torch.cat([down_e_b, torch.zeros_like(down_d_b)]).to(dt)
            z = torch.addmm(b_down, x2d, w_down.t())
            s = ted_stencil.ted_stencil_forward(z, conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b, num_frames, h, w)
            w_up_t = torch.cat([up_e_w, up_d_w], dim=1).to(dt).t().contiguous()
            out = ted_matmul.ted_up_projection(s, w_up_t, residual.reshape(m, c), up_e_b, up_d_b, length)
        # x rather than x2d: when x is contiguous they share storage, and saving the caller's
        # tensor keeps the saved-tensor version check meaningful.
        ctx.save_for_backward(x, z, down_e_w, down_d_w, conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b,
                              up_e_w, up_d_w)
        ctx.geometry = (num_frames, h, w, r)
        ctx.param_dtypes = {n: p.dtype for n, p in zip(_PARAM_NAMES, (
            down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b,
            down_d_w, down_d_b, conv_d_w, conv_d_b, up_d_w, up_d_b))}
        # residual is x: fold grad_residual into dx's GEMM (addmm) instead of autograd adding two
        # (M, C) tensors afterwards.
        ctx.residual_is_x = residual is x
        return out.reshape(bt, length, c)

    @staticmethod
    @once_differentiable  # hand-written: create_graph=True must raise, not build a partial graph
    def backward(ctx, grad_out):
        (x, z, down_e_w, down_d_w, conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b,
         up_e_w, up_d_w) = ctx.saved_tensors
        frames, h, w, r = ctx.geometry
        need = dict(zip(("x", "residual") + _PARAM_NAMES, ctx.needs_input_grad))
        bt, length, c = x.shape
        m = bt * length
        dt = x.dtype
        grads = dict.fromkeys(("x", "residual") + _PARAM_NAMES)
        with _kernel_scope(x):
            g = grad_out.reshape(m, c).contiguous()
            if need["up_e_b"]:
                grads["up_e_b"] = g.sum(0, dtype=torch.float32)
            if need["up_d_b"]:
                grads["up_d_b"] = g.view(bt, length, c)[:, 1:].sum((0, 1), dtype=torch.float32)
            fold_residual = ctx.residual_is_x and need["x"]
            if need["residual"] and not fold_residual:
                grads["residual"] = grad_out

            need_up_w = need["up_e_w"] or need["up_d_w"]
            need_dz = any(need[n] for n in ("x", "down_e_w", "down_e_b", "conv_e_w", "conv_e_b",
                                            "down_d_w", "down_d_b", "conv_d_w", "conv_d_b"))
            s = dz = None
            if need_dz:
                w_up = torch.cat([up_e_w, up_d_w], dim=1).to(dt)
                ds = g @ w_up
                dz, s, stencil_grads = ted_stencil.ted_stencil_backward(
                    z, ds, conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b, frames, h, w, recompute_s=need_up_w)
                del ds
                grads["conv_e_w"] = stencil_grads["conv_e_w"].reshape(r, 1, 3)
                grads["conv_d_w"] = stencil_grads["conv_d_w"].reshape(r, 1, 3, 3)
                for n in ("conv_e_b", "down_e_b", "conv_d_b", "down_d_b"):
                    grads[n] = stencil_grads[n]
            elif need_up_w:
                s = ted_stencil.ted_stencil_forward(z, conv_e_w, conv_e_b, conv_d_w, conv_d_b, down_d_b, frames, h, w)

            if need_up_w:
                dw_up = g.t() @ s
                grads["up_e_w"], grads["up_d_w"] = dw_up[:, :r], dw_up[:, r:]
            if dz is not None:
                x2d = x.reshape(m, c)
                if need["x"]:
                    w_down = torch.cat([down_e_w, down_d_w]).to(dt)
                    dx = torch.addmm(g, dz, w_down) if fold_residual else dz @ w_down
                    grads["x"] = dx.reshape(bt, length, c)
                if need["down_e_w"] or need["down_d_w"]:
                    dw_down = dz.t() @ x2d
                    grads["down_e_w"], grads["down_d_w"] = dw_down[:r], dw_down[r:]

        out = [grads["x"], grads["residual"]]
        for n in _PARAM_NAMES:
            gn = grads[n] if need[n] else None
            out.append(None if gn is None else gn.to(ctx.param_dtypes[n]))
        return (*out, None, None, None)


def ted_adapter_triton(x, residual, down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b,
                       down_d_w, down_d_b, conv_d_w, conv_d_b, up_d_w, up_d_b,
                       num_frames: int, h: int, w: int) -> torch.Tensor:
    """Fused TED-Adapter: residual + E(x) + [0; D(x)] (see ``m2clip_fast.adapters.TEDAdapter``).

    x, residual: (B·T, 1 + h·w, C), same dtype and device (may be the same tensor). Parameters use
    the TEDAdapter state_dict shapes and may be fp32 masters for fp16/bf16 x: they are cast to
    x.dtype for the GEMMs, all accumulation is fp32, and their gradients come back in their own dtype.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not importable: {_IMPORT_ERROR}")
    token_layout(x, num_frames, (h, w))
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16 (the kernels accumulate in fp32), got {x.dtype}")
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        raise ValueError(f"residual must match x's shape {tuple(x.shape)}, "
                         f"got {tuple(getattr(residual, 'shape', ()))}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise TypeError(f"residual is {residual.dtype} on {residual.device}, x is {x.dtype} on {x.device}")
    params = (down_e_w, down_e_b, conv_e_w, conv_e_b, up_e_w, up_e_b,
              down_d_w, down_d_b, conv_d_w, conv_d_b, up_d_w, up_d_b)
    _check_params(x.shape[-1], dict(zip(_PARAM_NAMES, params)))
    if not (x.is_cuda or _kernels_interpreted()):
        raise RuntimeError("the Triton TED kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is first imported (open_clip imports it) to run them on the CPU")
    return TEDTritonFunction.apply(x, residual, *params, num_frames, h, w)
