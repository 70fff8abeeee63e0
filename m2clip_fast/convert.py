"""Checkpoint conversion between the official M²-CLIP ``Adapter2`` and our ``TEDAdapter``.

The official adapter names its E branch ``fc1 → conv (Conv1d over T) → fc2`` and its D branch
``offset_adapter.{fc1, conv, fc2}`` with a Conv3d of kernel (1, 3, 3); our names are
``down_e / conv_e / up_e`` and ``down_d / conv_d / up_d`` with a Conv2d. The math is the same
(see ``TEDAdapter``), so conversion is a rename plus dropping the Conv3d's unit time axis.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

# official key → ours; weights of the D conv additionally change rank (Conv3d → Conv2d).
_KEY_MAP: Dict[str, str] = {
    "fc1.weight": "down_e.weight",
    "fc1.bias": "down_e.bias",
    "conv.weight": "conv_e.weight",
    "conv.bias": "conv_e.bias",
    "fc2.weight": "up_e.weight",
    "fc2.bias": "up_e.bias",
    "offset_adapter.fc1.weight": "down_d.weight",
    "offset_adapter.fc1.bias": "down_d.bias",
    "offset_adapter.conv.weight": "conv_d.weight",
    "offset_adapter.conv.bias": "conv_d.bias",
    "offset_adapter.fc2.weight": "up_d.weight",
    "offset_adapter.fc2.bias": "up_d.bias",
}


def _expected_shapes(dim: int, r: int, kt: int, ks: int, official: bool) -> Dict[str, Tuple[int, ...]]:
    """Shapes under our keys for width C = dim, bottleneck r, kernels kt (time) and ks (space)."""
    return {
        "down_e.weight": (r, dim), "down_e.bias": (r,),
        "conv_e.weight": (r, 1, kt), "conv_e.bias": (r,),
        "up_e.weight": (dim, r), "up_e.bias": (dim,),
        "down_d.weight": (r, dim), "down_d.bias": (r,),
        "conv_d.weight": (r, 1, 1, ks, ks) if official else (r, 1, ks, ks), "conv_d.bias": (r,),
        "up_d.weight": (dim, r), "up_d.bias": (dim,),
    }


def _rename(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str], source: str) -> Dict[str, torch.Tensor]:
    missing = sorted(k for k in key_map if k not in state)
    unexpected = sorted(k for k in state if k not in key_map)
    if missing or unexpected:
        raise KeyError(f"not a complete {source} adapter state: missing {missing or 'none'}, "
                       f"unexpected {unexpected or 'none'}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source} key {key!r} holds {type(value).__name__}, not a tensor")
    return {key_map[k]: state[k] for k in key_map}


def _check_shapes(ours: Mapping[str, torch.Tensor], official: bool, naming: Mapping[str, str]) -> None:
    """Every shape must agree with C and r read off down_e.weight and the conv kernel sizes."""
    r, dim = ours["down_e.weight"].shape if ours["down_e.weight"].dim() == 2 else (-1, -1)
    kt = ours["conv_e.weight"].shape[-1] if ours["conv_e.weight"].dim() == 3 else -1
    ks = ours["conv_d.weight"].shape[-1] if ours["conv_d.weight"].dim() >= 2 else -1
    expected = _expected_shapes(dim, r, kt, ks, official)
    wrong = [f"{naming[k]}: got {tuple(v.shape)}, expected {expected[k]}"
             for k, v in ours.items() if tuple(v.shape) != expected[k]]
    if r < 1 or wrong:
        raise ValueError(f"inconsistent adapter shapes (C={dim}, r={r}, kernels {kt}/{ks}): " + "; ".join(wrong))
    if kt % 2 == 0 or ks % 2 == 0:
        raise ValueError(f"conv kernels must be odd, got temporal {kt} and spatial {ks}")


def convert_official_adapter(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Official ``Adapter2`` state (keys ``fc1.*``, ``conv.*``, ``fc2.*``, ``offset_adapter.*``) → TEDAdapter state.

    ``prefix``: if given (e.g. ``"visual.transformer.resblocks.11.adapter_pre_attn."``), only keys
    under it are taken, with the prefix stripped; otherwise ``state`` must hold exactly the 12 keys.
    The result loads into ``TEDAdapter(dim=C, bottleneck=r, temporal_kernel=kt, spatial_kernel=ks)``
    (or ``FusedTEDAdapter``) with ``strict=True``. Tensors are shared, not copied, except the
    reshaped D conv weight. Raises KeyError for missing/unexpected keys, ValueError for bad shapes.
    """
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"no keys start with prefix {prefix!r}")
    ours = _rename(state, _KEY_MAP, "official")
    _check_shapes(ours, official=True, naming={v: k for k, v in _KEY_MAP.items()})
    ours["conv_d.weight"] = ours["conv_d.weight"].squeeze(2)
    return ours


def to_official_adapter(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of ``convert_official_adapter``: TEDAdapter state → official ``Adapter2`` keys and shapes."""
    inverse = {v: k for k, v in _KEY_MAP.items()}
    renamed = _rename(state, {k: k for k in inverse}, "TEDAdapter")
    _check_shapes(renamed, official=False, naming={k: k for k in inverse})
    out = {inverse[k]: v for k, v in renamed.items()}
    out["offset_adapter.conv.weight"] = renamed["conv_d.weight"].unsqueeze(2)
    return out
