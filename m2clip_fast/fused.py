"""FusedTEDAdapter: the TEDAdapter module on the fused kernels (Triton on CUDA, C++ on CPU).

Same constructor and state_dict as ``TEDAdapter`` (either loads into the other); only the
computation differs. Backends:

* ``"auto"`` (default): CUDA tensors → Triton (``m2clip_fast.kernels.ted``); CPU tensors → the C++
  extension ``m2clip_fast._C``. If the needed one is missing, the reference path runs and a one-line
  warning says so, once per process.
* ``"triton"``: always Triton; CPU tensors need TRITON_INTERPRET=1 (set before triton is imported).
* ``"cpu"``: always the C++ path (CPU tensors).
* ``"reference"``: ``TEDAdapter.forward``.

Falls back to the reference path, whatever the backend, for what the fused kernels do not cover:
class tokens alone (x of shape (B·T, 1, C), see ``TEDAdapter.forward``), a disabled branch
(TE-only / TD-only ablations), kernel sizes other than 3, dtypes other than
float32/bfloat16 on CPU (float16 also on Triton), a residual of another dtype than x (the
reference promotes), and forward-mode AD or torch.func transforms over x, the residual or the
parameters.
Double backward (``create_graph=True`` through the adapter) is not supported by the fused paths:
it raises, since their backward is hand-written and not itself differentiable.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import ted_cpu
from .adapters import Grid, TEDAdapter, token_layout

BACKENDS = ("auto", "triton", "cpu", "reference")

_NOTICES_SHOWN: set = set()  # one fallback notice per process and kind


def extension_available() -> bool:
    """True when the C++ extension ``m2clip_fast._C`` imported (it is optional at install time)."""
    return ted_cpu._C is not None


def _notice_once(key: str, message: str) -> None:
    if key not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_entry():
    """(ted_adapter_triton or None, reason it cannot run). Imported lazily: Triton is heavy and optional."""
    try:
        from m2clip_fast.kernels import ted as triton_ted
    except ImportError as exc:
        return None, f"m2clip_fast.kernels.ted is not importable ({exc})"
    available = getattr(triton_ted, "triton_available", None)
    if available is not None and not available():
        return None, "Triton cannot run here (no CUDA, and TRITON_INTERPRET=1 was not set before importing triton)"
    return triton_ted.ted_adapter_triton, None


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _autograd_unsupported(tensors) -> Optional[str]:
    """Why a hand-written backward cannot serve a call on these tensors (inputs and parameters), or None."""
    for t in tensors:
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "torch.func transform"
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD"
    return None


class FusedTEDAdapter(TEDAdapter):
    """``TEDAdapter`` computed by the fused kernels; see the module docstring for backends and fallbacks.

    Args: as ``TEDAdapter``, plus ``backend`` in ``BACKENDS``.
    forward(x (B·T, 1+h·w, C), num_frames=None, residual=None) → residual + E(x) + [0; D(x)].
    """

    def __init__(self, dim: int, bottleneck: int = 384, num_frames: int = 8, grid: Optional[Grid] = None,
                 temporal_kernel: int = 3, spatial_kernel: int = 3, enhance: bool = True, difference: bool = True,
                 backend: str = "auto"):
        super().__init__(dim, bottleneck, num_frames, grid, temporal_kernel, spatial_kernel, enhance, difference)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"

    @property
    def fused_config_supported(self) -> bool:
        """Both branches on and 3-tap kernels: the only configuration the fused kernels implement."""
        return self.enhance and self.difference and self.temporal_kernel == 3 and self.spatial_kernel == 3

    def select_backend(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> str:
        """The path ``forward(x, residual=residual)`` takes: "triton", "cpu" or "reference" (may warn or
        raise, see module doc)."""
        if self.backend == "reference" or not self.fused_config_supported:
            return "reference"
        inputs = (x,) if residual is None else (x, residual)
        if _autograd_unsupported((*inputs, *self.parameters())):
            return "reference"
        if x.dim() == 3 and x.shape[1] == 1:
            return "reference"  # class tokens alone: the E branch on B·T rows, no stencil to fuse
        if residual is not None and residual.dtype != x.dtype:
            return "reference"
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda):
            fn, reason = _triton_entry()
            if fn is not None:
                return "triton" if x.dtype in TRITON_DTYPES else "reference"
            if self.backend == "triton":
                raise RuntimeError(f"FusedTEDAdapter(backend='triton'): {reason}")
            _notice_once("triton", f"FusedTEDAdapter: Triton path unavailable ({reason}); using the reference path")
            return "reference"
        if self.backend == "cpu" and x.device.type != "cpu":
            raise ValueError(f"FusedTEDAdapter(backend='cpu') got a tensor on {x.device}")
        if x.device.type != "cpu":
            return "reference"  # neither CUDA nor CPU: no fused kernels for this device
        if not extension_available():
            if self.backend == "cpu":
                raise RuntimeError("FusedTEDAdapter(backend='cpu'): the C++ extension m2clip_fast._C is not built "
                                   "(reinstall with a C++ compiler: pip install --no-build-isolation -e .)")
            _notice_once("cpu", "FusedTEDAdapter: C++ extension m2clip_fast._C not built; CPU runs the (slower) "
                                "reference path — rebuild with `pip install --no-build-isolation -e .`")
            return "reference"
        return "cpu" if ted_cpu.supports(x) is None else "reference"

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        path = self.select_backend(x, residual)
        if path == "reference":
            return super().forward(x, num_frames, residual)
        _, frames, h, w = token_layout(x, num_frames or self.num_frames, self.grid)
        base = x if residual is None else residual
        if path == "triton":
            fn, _ = _triton_entry()
        else:
            fn = ted_cpu.ted_adapter_cpu
        return fn(x, base, self.down_e.weight, self.down_e.bias, self.conv_e.weight, self.conv_e.bias,
                  self.up_e.weight, self.up_e.bias, self.down_d.weight, self.down_d.bias, self.conv_d.weight,
                  self.conv_d.bias, self.up_d.weight, self.up_d.bias, frames, h, w)
