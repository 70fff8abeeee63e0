"""Tolerances for comparing two floating-point computations of one function, derived from an error model.

Two implementations of the same function (fused vs eager, class-token-only vs full block, checkpointed vs
not, one backend vs another) differ by rounding error, and rounding error depends on reduction lengths,
magnitudes and cancellation, and on the processor's summation order (SIMD width, GEMM blocking, thread
count). A fixed rtol/atol tuned on one machine is therefore either loose or fails on another one.

The rule used instead is flash-attention's: compute the function once more in float64 (``exact``), measure
the error of the reference implementation run in the working dtype, and allow the candidate a small
multiple of it. Errors are measured relative to each tensor's largest magnitude and pooled over the
tensors of one computation (a loss and all its gradients, an output and its gradients):

    ρ(x)  =  max over tensors t of  max|x_t − exact_t| / max|exact_t|
    every tensor t must satisfy
        max|got_t − exact_t|  ≤  (FACTOR · ρ(reference) + FLOOR_ULPS · eps) · max|exact_t|

Why pooled: the error in a gradient is mostly forward error propagated through the same network, so it is
of one relative size across tensors, but in a tensor of a few elements the maximum of it is a lottery; a
reference landing within 1 ulp on an 8-element bias says nothing about how lucky another, equally valid
summation order will be on it (measured on the tiny model: 0.6 ulp vs 4.0 ulp for mlm_head.decoder.bias,
while the worst tensor of either path was at 9-19 ulp). The pooled ρ is a maximum over thousands of
elements, a stable statistic.
FACTOR = 2: both sides round the same operations in a different order, so their pooled errors have the
same size (measured: within 1.25× of each other); 2 leaves room for one order being less lucky, while a
real bug is off by a fraction of the value itself: the class-token-only block attending to one key too few
(of 17) moved the losses by 6e-4 relative, with 4.6e-6 allowed; a wrong row moves them by 0.1-0.4.
FLOOR_ULPS = 1: each side is rounded to the working dtype at least once, so even a correctly rounded
result is up to half a unit in the last place from float64, on either side; without the floor a reference
that happens to be exact (an all-integer sum, a single product) would demand exactness of the candidate.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch

FACTOR = 2.0
FLOOR_ULPS = 1.0

Tensors = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _as_dict(x: Tensors) -> Mapping[str, torch.Tensor]:
    return x if isinstance(x, Mapping) else {"tensor": x}


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got − exact|, computed in float64."""
    return (got.detach().double() - exact.detach().double()).abs().max().item()


def _scale(exact: torch.Tensor) -> float:
    return exact.detach().abs().max().item()


def relative_error(got: Tensors, exact: Tensors) -> float:
    """ρ: the largest over tensors of max|got_t − exact_t| / max|exact_t| (all-zero exact tensors skipped)."""
    got, exact = _as_dict(got), _as_dict(exact)
    return max((max_error(got[n], e) / _scale(e) for n, e in exact.items() if _scale(e) > 0), default=0.0)


def reference_error_violations(got: Tensors, reference: Tensors, exact: Tensors,
                               dtype: Optional[torch.dtype] = None, factor: float = FACTOR,
                               floor_ulps: float = FLOOR_ULPS) -> Dict[str, str]:
    """{name: why} for every tensor of ``got`` outside the bound above; empty when all are within.

    got, reference: the candidate and the reference implementation in the working ``dtype`` (default:
    that of the first reference tensor), as tensors or mappings name → tensor with the names of
    ``exact``, the same function computed in float64. A name missing from ``got`` is a violation.
    """
    got, reference, exact = _as_dict(got), _as_dict(reference), _as_dict(exact)
    dtype = dtype or next(iter(reference.values())).dtype
    rho_ref = relative_error(reference, exact)
    allowed = factor * rho_ref + floor_ulps * torch.finfo(dtype).eps
    found = {}
    for name, want in exact.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            found[name] = f"shape {None if have is None else tuple(have.shape)}, expected {tuple(want.shape)}"
            continue
        scale = _scale(want)
        err = max_error(have, want)
        # an all-zero exact tensor: the reference's own absolute error on it is the only scale there is
        bound = allowed * scale if scale > 0 else factor * max_error(reference[name], want)
        if err > bound:
            found[name] = (f"error vs float64 {err:.3e} = {err / scale if scale else float('inf'):.2e} × max|exact| "
                           f"{scale:.3e}, allowed {allowed:.2e} × (reference's pooled {rho_ref:.2e} × {factor:g} "
                           f"+ {floor_ulps:g} ulp)")
    return found


def assert_within_reference_error(got: Tensors, reference: Tensors, exact: Tensors, what: str = "",
                                  **kwargs) -> None:
    """Assert the bound above (see ``reference_error_violations`` for the arguments)."""
    found = reference_error_violations(got, reference, exact, **kwargs)
    assert not found, f"{what}: " + "; ".join(f"{name}: {why}" for name, why in found.items())
