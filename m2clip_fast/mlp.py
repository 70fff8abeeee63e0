"""CLIP's QuickGELU MLP in SiLU form: one activation kernel instead of three, the constants on the GEMMs.

QuickGELU(h) = h·σ(1.702·h) = SiLU(1.702·h) / 1.702, so for open_clip's ``c_proj(QuickGELU(c_fc(x)))``

    g = SiLU(1.702·(x·W_fcᵀ + b_fc))          addmm with alpha = beta = 1.702, then one SiLU
    y = g·W_projᵀ / 1.702 + b_proj             addmm with alpha = 1/1.702

In the forward the scalings ride on the two GEMMs (addmm's alpha and beta) and cost nothing; in the backward
ATen applies the second one as a multiply over the (N, 4·width) gradient. ATen runs QuickGELU as three
elementwise ops (mul, sigmoid, mul), each a pass over the (N, 4·width) hidden and a fresh tensor of its size,
and its sigmoid is slow on the CPU: on (3152, 3072) fp32 (two 8-frame clips of ViT-B/16) it took 97 ms
against 9 ms for an in-place SiLU, which made the whole MLP 472 → 366 ms on 2 Zen 3 cores. Without autograd
SiLU runs in place; with it, autograd keeps one (N, 4·width) tensor per MLP instead of two when the MLP's
weights are frozen (as in M2-CLIP; two instead of three when they train).

The result differs from the reference by rounding only (1.702 and its inverse are not exact in binary):
about 4e-7 of the output's scale in fp32. The module keeps open_clip's ``nn.Sequential(c_fc, gelu,
c_proj)`` children, so parameters and state_dict are the same; :func:`set_mlp_form` swaps the class in
place, both ways, as ``attention.set_attention_backend`` does for attention. Whenever the children are no
longer exactly those (a slice, an appended module, a wrapped or quantised linear, a parametrisation) or any
of them has a hook (pruning, feature taps), the module runs as the plain ``nn.Sequential`` it stands for,
so what was done to the children takes effect. TorchScript scripting is not supported (``fused=False``
builds open_clip's own MLP); tracing is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUICK_GELU_SLOPE = 1.702  # the constant of CLIP's QuickGELU, x·σ(1.702·x)


def _quick_gelu_type():
    from open_clip.transformer import QuickGELU

    return QuickGELU


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def is_plain_quick_gelu_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is exactly open_clip's QuickGELU MLP: children ``c_fc``, ``gelu``, ``c_proj``, both
    plain ``nn.Linear`` with biases, a ``QuickGELU``, and no hooks on any of them."""
    if not isinstance(module, nn.Sequential) or list(module._modules) != ["c_fc", "gelu", "c_proj"]:
        return False
    fc, act, proj = module.c_fc, module.gelu, module.c_proj
    return (type(act) is _quick_gelu_type() and type(fc) is nn.Linear and type(proj) is nn.Linear
            and fc.bias is not None and proj.bias is not None and not any(map(_hooked, (fc, act, proj))))


class SiLUFormMLP(nn.Sequential):
    """open_clip's QuickGELU MLP (children ``c_fc``, ``gelu``, ``c_proj``) computed in SiLU form.
    x (..., width) → (..., width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_plain_quick_gelu_mlp(self):
            return super().forward(x)  # its children were changed or hooked: run them as they are
        fc, proj = self.c_fc, self.c_proj
        rows = x.reshape(-1, x.shape[-1])
        k = QUICK_GELU_SLOPE
        hidden = torch.addmm(fc.bias, rows, fc.weight.t(), beta=k, alpha=k)
        # in place only outside autograd; a trace checks itself in another grad mode than it recorded
        in_place = not torch.is_grad_enabled() and not torch.jit.is_tracing()
        hidden = F.silu(hidden, inplace=in_place)
        out = torch.addmm(proj.bias, hidden, proj.weight.t(), alpha=1.0 / k)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def set_mlp_form(module: nn.Module, silu_form: bool) -> int:
    """Every QuickGELU MLP under ``module`` becomes a :class:`SiLUFormMLP` (``silu_form``) or open_clip's
    plain ``nn.Sequential`` again (every SiLUFormMLP, whatever was done to its children since). Returns how
    many were set; MLPs with another activation (a GELU backbone) are left alone."""
    count = 0
    for sub in module.modules():
        if silu_form and type(sub) is nn.Sequential and is_plain_quick_gelu_mlp(sub):
            sub.__class__ = SiLUFormMLP
            count += 1
        elif not silu_form and type(sub) is SiLUFormMLP:
            sub.__class__ = nn.Sequential
            count += 1
    return count
