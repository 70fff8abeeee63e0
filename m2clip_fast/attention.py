"""Selectable attention backends for ``nn.MultiheadAttention`` (and so for open_clip's CLIP).

open_clip's ``ResidualAttentionBlock`` calls ``self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=m)[0]`` on an
``nn.MultiheadAttention(batch_first=True)``. ``set_attention_backend(model, name)`` turns every such module inside
``model`` into this file's ``MultiheadAttention`` (same parameters, same state_dict keys) whose forward runs the
attention core through one of:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` — flash / memory-efficient kernels on CUDA, the flash
  kernel on CPU. open_clip's float causal text mask is recognised and replaced by ``is_causal=True``, which the
  flash kernels need (a materialised mask forces a slower kernel).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors only; an error otherwise).
- ``"math"``: a plain reference, q·kᵀ/√d + mask → softmax (fp32) → ·v, for tests.
- ``"torch"``: PyTorch's own ``nn.MultiheadAttention`` again (undoes the swap; for A/B comparisons).

Shapes: E = embed_dim, H = num_heads, d = E / H, B = batch, L = query length, S = key/value length.
"""
from __future__ import annotations

import importlib
import weakref
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCH = "torch"
BACKENDS = ("sdpa", "xformers", "math", TORCH)
DEFAULT_BACKEND = "sdpa"

__all__ = ["MultiheadAttention", "set_attention_backend", "get_attention_backend", "BACKENDS", "DEFAULT_BACKEND"]


# ------------------------------------------------------------------------------------------ causal detection
def _is_exact_causal(mask: torch.Tensor) -> bool:
    """mask (n, n): True iff it is the causal mask: nn.MultiheadAttention's bool form (True above the diagonal)
    or open_clip's additive float form (-inf above the diagonal, 0 elsewhere)."""
    n = mask.shape[0]
    if mask.dtype == torch.bool:
        expected = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu_(1)
    else:
        expected = torch.full((n, n), float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    return torch.equal(mask, expected)


class _CausalMaskCache:
    """Remembers which masks are exactly causal, so that a mask passed to every layer on every step is compared
    once (the comparison is O(n²) and, on CUDA, a host sync).

    The key is the tensor owning the memory (a view's ``_base``; open_clip and M2CLIP pass slices of one causal
    buffer), held by a weak reference and required to still be that very object, plus the view's offset, shape,
    strides, dtype and device, plus the version counter that every in-place write bumps. A hit therefore means
    the contents are the ones that were compared: a new tensor at a recycled address, or a buffer edited in
    place, is compared again.
    """

    def __init__(self):
        # id(base) -> (weakref to base, base version, {view key: is causal})
        self._entries: Dict[int, Tuple[weakref.ref, int, Dict[tuple, bool]]] = {}

    def is_causal(self, mask: torch.Tensor) -> bool:
        if mask.is_inference():  # inference tensors have no version counter: nothing proves them unchanged
            return _is_exact_causal(mask)
        base = mask._base if mask._base is not None else mask
        version = mask._version  # shared by a view and its base
        view_key = (mask.storage_offset(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device)
        entry = self._entries.get(id(base))
        if entry is None or entry[0]() is not base or entry[1] != version:
            entry = (weakref.ref(base, partial(self._forget, id(base))), version, {})
            self._entries[id(base)] = entry
        views = entry[2]
        if view_key not in views:
            views[view_key] = _is_exact_causal(mask)
        return views[view_key]

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:  # not an entry a newer tensor at the same address made
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


_CAUSAL_CACHE = _CausalMaskCache()


def _detection_allowed(mask: torch.Tensor) -> bool:
    """Whether a data-dependent causal check may run now: not while torch.compile traces (it would break the
    graph) nor while a CUDA graph is captured (torch.equal syncs). The mask is then applied as given."""
    if torch.compiler.is_compiling():
        return False
    return not (mask.is_cuda and torch.cuda.is_current_stream_capturing())


# -------------------------------------------------------------------------------------------------- masks
def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask conventions → an additive float mask in ``dtype``:
    bool True means "may not attend" (→ -inf); a float mask is added to the scores as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _prepare_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool,
                  b: int, h: int, l: int, s: int, dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], bool]:
    """Combine nn.MultiheadAttention's masks into (additive mask broadcastable to (B, H, L, S) or None, causal).

    attn_mask: (L, S) or (B·H, L, S); key_padding_mask: (B, S) (True or -inf = ignore that key).
    ``causal`` is returned instead of a mask when the only mask is exactly the causal one (or none is given
    with ``is_causal=True``), so that the kernels can skip the masked half without reading a mask.
    """
    if attn_mask is not None:
        expected = {2: (l, s), 3: (b * h, l, s)}.get(attn_mask.dim())
        if tuple(attn_mask.shape) != expected:
            raise ValueError(f"attn_mask must be (L, S) = ({l}, {s}) or (B*heads, L, S) = ({b * h}, {l}, {s}), "
                             f"got {tuple(attn_mask.shape)}")
    if key_padding_mask is None:
        if attn_mask is None:
            return None, is_causal
        if attn_mask.dim() == 2 and l == s and _detection_allowed(attn_mask) and _CAUSAL_CACHE.is_causal(attn_mask):
            return None, True
    elif attn_mask is None and is_causal:  # the causal hint must now be materialised next to the padding
        attn_mask = torch.ones(l, s, dtype=torch.bool, device=key_padding_mask.device).triu_(1)

    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.unflatten(0, (b, h))  # (B·H, L, S) → (B, H, L, S), a view
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, s):
            raise ValueError(f"key_padding_mask must be (B, S) = ({b}, {s}), got {tuple(key_padding_mask.shape)}")
        padding = _additive(key_padding_mask, dtype)[:, None, None, :]  # (B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    return mask, False


# ----------------------------------------------------------------------------------------------- backends
# Each takes q (B, L, H, d), k and v (B, S, H, d), an additive mask broadcastable to (B, H, L, S) or None,
# ``causal`` (the top-left lower-triangular mask, L = S) and the dropout probability; returns (B, L, H, d).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], bool, float], torch.Tensor]


def _attend_sdpa(q, k, v, mask, causal, dropout_p):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


def _attend_math(q, k, v, mask, causal, dropout_p):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, ·, d)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, S) in the input dtype
    if causal:
        l, s = scores.shape[-2:]  # top-left aligned, as sdpa's is_causal
        scores = scores.masked_fill(torch.ones(l, s, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if mask is not None:
        scores = scores + mask
    probs = scores.float().softmax(dim=-1).to(q.dtype)  # fp32 softmax: exp/sum lose most in low precision
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).transpose(1, 2)


def _xformers_ops():
    """xformers.ops, or an ImportError that says what to do."""
    try:
        return importlib.import_module("xformers.ops")
    except ImportError as err:
        raise ImportError("attention backend 'xformers' needs the xformers package, which is not installed "
                          f"({err}); install an xformers build matching this torch and CUDA, or use "
                          "backend 'sdpa'") from err


def _xformers_bias(mask: torch.Tensor, b: int, h: int, l: int, s: int) -> torch.Tensor:
    """An additive mask broadcastable to (B, H, L, S) → the (B, H, L, S) tensor xformers takes: every stride but
    the last a multiple of 8 elements (rows 16-byte aligned even in fp16; broadcast dims keep stride 0), made by
    slicing the padding columns off a wider buffer."""
    m = mask if mask.dim() == 4 else mask[None, None]
    mb, mh = m.shape[:2]
    padded = torch.empty(mb, mh, l, s + (-s % 8), dtype=mask.dtype, device=mask.device)[..., :s]
    padded.copy_(m.expand(mb, mh, l, s))
    return padded.expand(b, h, l, s)


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise RuntimeError(f"attention backend 'xformers' runs on CUDA tensors only, got {device.type} tensors; "
                           "use set_attention_backend(model, 'sdpa') for this device")


def _attend_xformers(q, k, v, mask, causal, dropout_p):
    _require_cuda(q.device)
    xops = _xformers_ops()
    if causal:
        bias = xops.LowerTriangularMask()
    elif mask is not None:
        bias = _xformers_bias(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    else:
        bias = None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)  # BMHK in and out


_ATTEND: Dict[str, AttendFn] = {"sdpa": _attend_sdpa, "xformers": _attend_xformers, "math": _attend_math}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends are {', '.join(BACKENDS)}")
    if backend == "xformers":
        _xformers_ops()
    return backend


# ------------------------------------------------------------------------------------------------- module
class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention core runs on a selectable backend (``self.backend``).

    Parameters, buffers and state_dict keys are the parent's (in_proj_weight (3E, E) or q/k/v_proj_weight,
    in_proj_bias (3E,), out_proj.weight (E, E), out_proj.bias (E,)), so pretrained weights load unchanged.

    forward(query (B, L, E), key (B, S, kdim), value (B, S, vdim)) → (out (B, L, E), None) for
    ``batch_first=True``; (L, B, ·) inputs otherwise, and unbatched (L, ·) inputs as in the parent.
    ``attn_mask``: (L, S) or (B·H, L, S), bool (True = masked) or additive float; ``key_padding_mask``: (B, S).
    ``is_causal=True`` stands for the causal mask when no attn_mask is given; a given attn_mask is applied as it
    is (and replaced by the kernels' causal mode only when it is exactly the causal mask).
    ``need_weights=True`` needs the full probability matrix that the fused kernels never form, so that call is
    answered by PyTorch's own implementation. Unsupported here: ``add_bias_kv`` and ``add_zero_attn``.
    """

    backend: str = DEFAULT_BACKEND

    def __init__(self, *args, backend: str = DEFAULT_BACKEND, **kwargs):
        super().__init__(*args, **kwargs)
        _check_swappable(self, type(self).__name__)
        self.backend = _check_backend(backend)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, backend={self.backend!r}"

    def _in_projection(self, query, key, value, self_attention: bool, shared_kv: bool):
        """q (…, L, H, d), k and v (…, S, H, d) in the inputs' layout: views into one GEMM's output for
        self-attention, into two (query; key = value) for cross-attention, into three otherwise."""
        e, w, bias = self.embed_dim, self.in_proj_weight, self.in_proj_bias
        heads = lambda x, n: x.unflatten(-1, (n, self.num_heads, self.head_dim)).unbind(-3)
        bq, bk, bv = (None,) * 3 if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:  # kdim/vdim differ from embed_dim: three weight tensors
            return (heads(F.linear(query, self.q_proj_weight, bq), 1)[0],
                    heads(F.linear(key, self.k_proj_weight, bk), 1)[0],
                    heads(F.linear(value, self.v_proj_weight, bv), 1)[0])
        if self_attention:
            return heads(F.linear(query, w, bias), 3)
        (q,) = heads(F.linear(query, w[:e], bq), 1)
        if shared_kv:  # the rows for k and v are adjacent in in_proj_weight: one GEMM, no weight copy
            k, v = heads(F.linear(key, w[e:], None if bias is None else bias[e:]), 2)
        else:
            (k,), (v,) = heads(F.linear(key, w[e:2 * e], bk), 1), heads(F.linear(value, w[2 * e:], bv), 1)
        return q, k, v

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        self_attention, shared_kv = query is key and key is value, key is value  # before any reshaping
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        seq_first = not self.batch_first and not unbatched
        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv)
        if seq_first:  # (L, B, H, d) → (B, L, H, d); a view: the projections stay where they are
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        b, l, h, _ = q.shape
        mask, causal = _prepare_mask(attn_mask, key_padding_mask, is_causal, b, h, l, k.shape[1], q.dtype)
        out = _ATTEND[self.backend](q, k, v, mask, causal, self.dropout if self.training else 0.0)
        out = out.flatten(-2)  # (B, L, E)
        if seq_first:
            out = out.transpose(0, 1)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # as the parent: no out_proj hooks
        return (out.squeeze(0) if unbatched else out), None


# ---------------------------------------------------------------------------------------------- swapping
def _check_swappable(module: nn.MultiheadAttention, name: str) -> None:
    if module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(f"{name or 'the module'}: MultiheadAttention with add_bias_kv or add_zero_attn "
                                  "is not supported by the attention backends")


def _attention_modules(module: nn.Module):
    """(name, m) for every nn.MultiheadAttention we can drive: plain ones and ours. Other subclasses have their
    own forward (e.g. torch.ao's quantizable one) and are left alone."""
    for name, m in module.named_modules():
        if type(m) is nn.MultiheadAttention or isinstance(m, MultiheadAttention):
            yield name, m


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Run every nn.MultiheadAttention inside ``module`` (``module`` itself included) on ``backend``.

    Plain ``nn.MultiheadAttention`` modules become ``MultiheadAttention`` in place (their class changes, so the
    object, its parameters — same tensors, requires_grad, dtype, device — its hooks and every reference to it
    stay as they are); already-swapped ones just change backend; ``"torch"`` turns them back into
    ``nn.MultiheadAttention``. Everything is checked before anything changes. Returns how many modules changed
    (0 when all already ran on ``backend``).

    Raises ValueError for an unknown backend, ImportError for ``"xformers"`` without xformers installed,
    NotImplementedError for a module using add_bias_kv / add_zero_attn.
    """
    _check_backend(backend)
    targets = list(_attention_modules(module))
    if backend != TORCH:
        for name, m in targets:
            _check_swappable(m, name)
    changed = 0
    for _, m in targets:
        if backend == TORCH:
            if type(m) is nn.MultiheadAttention:
                continue
            m.__class__ = nn.MultiheadAttention
            m.__dict__.pop("backend", None)
        else:
            if isinstance(m, MultiheadAttention) and m.backend == backend:
                continue
            m.__class__ = MultiheadAttention
            m.backend = backend
        changed += 1
    return changed


def get_attention_backend(module: nn.Module) -> Optional[str]:
    """The backend every attention module inside ``module`` runs on ("torch" for plain nn.MultiheadAttention),
    or None if it has none. Raises ValueError when they differ, with the count per backend."""
    counts: Dict[str, int] = {}
    for _, m in _attention_modules(module):
        name = m.backend if isinstance(m, MultiheadAttention) else TORCH
        counts[name] = counts.get(name, 0) + 1
    if len(counts) > 1:
        raise ValueError(f"attention modules run on different backends: {counts}")
    return next(iter(counts), None)
