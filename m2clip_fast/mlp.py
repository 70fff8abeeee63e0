"""CLIP's QuickGELU MLP in SiLU form: one activation kernel instead of three, the constants on the GEMMs.

QuickGELU(h) = h·σ(1.702·h) = SiLU(1.702·h) / 1.702, so for open_clip's ``c_proj(QuickGELU(c_fc(x)))``

    g = SiLU(1.702·(x·W_fcᵀ + b_fc))          addmm with alpha = beta = 1.702, then one SiLU
    y = g·W_projᵀ / 1.702 + b_proj             addmm with alpha = 1/1.702

The scalings ride on the two GEMMs (addmm's alpha and beta), so they cost nothing. ATen runs QuickGELU as
three elementwise ops (mul, sigmoid, mul), each a pass over the (N, 4·width) hidden and a fresh tensor of
its size, and its sigmoid is slow on the CPU: on (3152, 3072) fp32 (two 8-frame clips of ViT-B/16) it took
97 ms against 9 ms for an in-place SiLU, which made the whole MLP 472 → 366 ms on 2 Zen 3 cores. Without
autograd SiLU runs in place; with it, autograd keeps one (N, 4·width) tensor per MLP instead of two.

The result differs from the reference by rounding only (1.702 and its inverse are not exact in binary):
about 4e-7 of the output's scale in fp32. The module keeps open_clip's ``nn.Sequential(c_fc, gelu,
c_proj)`` children, so parameters and state_dict are the same; :func:`set_mlp_form` swaps the class in
place, both ways, as ``attention.set_attention_backend`` does for attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUICK_GELU_SLOPE = 1.702  # the constant of CLIP's QuickGELU, x·σ(1.702·x)


class SiLUFormMLP(nn.Sequential):
    """open_clip's QuickGELU MLP (children ``c_fc``, ``gelu``, ``c_proj``) computed in SiLU form.
    x (..., width) → (..., width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = self.c_fc, self.c_proj
        rows = x.reshape(-1, x.shape[-1])
        k = QUICK_GELU_SLOPE
        hidden = torch.addmm(fc.bias, rows, fc.weight.t(), beta=k, alpha=k)
        hidden = F.silu(hidden, inplace=not torch.is_grad_enabled())
        out = torch.addmm(proj.bias, hidden, proj.weight.t(), alpha=1.0 / k)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _is_quick_gelu_mlp(module: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    if not isinstance(module, nn.Sequential) or list(module._modules) != ["c_fc", "gelu", "c_proj"]:
        return False
    fc, act, proj = module.c_fc, module.gelu, module.c_proj
    return (type(act) is QuickGELU and isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)
            and fc.bias is not None and proj.bias is not None)


def set_mlp_form(module: nn.Module, silu_form: bool) -> int:
    """Every QuickGELU MLP under ``module`` becomes a :class:`SiLUFormMLP` (``silu_form``) or open_clip's
    plain ``nn.Sequential`` again. Returns how many were set; MLPs with another activation (a GELU backbone)
    are left alone."""
    count = 0
    for sub in module.modules():
        if _is_quick_gelu_mlp(sub):
            sub.__class__ = SiLUFormMLP if silu_form else nn.Sequential
            count += 1
    return count
