"""Comparison baselines and measurement helpers for the adapter benchmarks (not used by the library).

``OfficialStyleTEDAdapter`` computes the TED adapter the way the official M²-CLIP release does —
an index gather for the previous frame, ``permute(...).contiguous()`` round trips around a
depthwise Conv1d over T (E branch) and a depthwise Conv3d with kernel (1, 3, 3) (D branch), the
D update added to the patch rows — and keeps the official parameter names (``fc1``, ``conv``,
``fc2``, ``offset_adapter.*``), so ``m2clip_fast.convert`` maps its state to ours. Unlike the
release it is out of place (no ``x[:, 1:] += ...``), so autograd can differentiate it.

``OfficialStyleM2CLIP`` / ``make_official_style(model)`` is the whole model trained the official way,
for the training-step benchmark: official-style TED adapters, open_clip's own nn.MultiheadAttention,
and every step the full CLIP text encoder (all 77 token columns, every layer, autograd on) over all
class prompts — no text cache, no end-of-text shortcut, no trimming of padding columns.

``randomise_tunable`` gives the trained parameters seeded random values (the same in every process), and
``saved_storages`` measures what autograd saves for backward.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2clip_fast.adapters import TEDAdapter
from m2clip_fast.attention import set_attention_backend
from m2clip_fast.convert import to_official_adapter
from m2clip_fast.mlp import set_mlp_form
from m2clip_fast.model import M2CLIP


class OffsetBranch(nn.Module):
    """The D branch under the official names: fc1 → Conv3d (1, k, k) on (B, r, T, h, w) → fc2."""

    def __init__(self, dim: int, bottleneck: int, spatial_kernel: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, (1, spatial_kernel, spatial_kernel),
                              padding=(0, spatial_kernel // 2, spatial_kernel // 2), groups=bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)

    def forward(self, x: torch.Tensor, frames: int, grid: Tuple[int, int]) -> torch.Tensor:
        bt, length, dim = x.shape
        batch, (h, w), r = bt // frames, grid, self.conv.in_channels
        patches = x[:, 1:, :].reshape(batch, frames, length - 1, dim)
        previous = [0] + list(range(frames - 1))  # frame 0 is its own predecessor: difference 0
        offset = self.fc1(patches - patches[:, previous])
        offset = offset.view(batch, frames, h, w, r).permute(0, 4, 1, 2, 3).contiguous()
        offset = self.conv(offset)
        offset = offset.permute(0, 2, 3, 4, 1).contiguous().view(bt, length - 1, r)
        return self.fc2(offset)


class OfficialStyleTEDAdapter(nn.Module):
    """Official-style eager TED adapter: out = residual + E(x) + [0; D(x)] (see module docstring)."""

    def __init__(self, dim: int, bottleneck: int, num_frames: int, grid: Optional[Tuple[int, int]] = None,
                 temporal_kernel: int = 3, spatial_kernel: int = 3):
        super().__init__()
        self.num_frames, self.grid = num_frames, grid
        self.fc1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv1d(bottleneck, bottleneck, temporal_kernel, padding=temporal_kernel // 2,
                              groups=bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)
        self.offset_adapter = OffsetBranch(dim, bottleneck, spatial_kernel)

    @classmethod
    def from_ted(cls, ted: TEDAdapter, check: bool = True) -> "OfficialStyleTEDAdapter":
        """A copy of ``ted`` (both branches on) in official form; ``check`` asserts both compute the same."""
        if not (ted.enhance and ted.difference):
            raise ValueError("the official adapter always has both branches")
        p = ted.down_e.weight
        model = cls(ted.dim, ted.bottleneck, ted.num_frames, ted.grid, ted.temporal_kernel, ted.spatial_kernel)
        model = model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(to_official_adapter(ted.state_dict()))
        if check:
            h, w = ted.grid or (2, 2)
            probe = torch.randn(2 * ted.num_frames, 1 + h * w, ted.dim, device=p.device, dtype=p.dtype)
            with torch.no_grad():
                ours, theirs = ted(probe), model(probe)
            scale = ours.abs().max().item() + 1e-6
            err = (ours - theirs).abs().max().item()
            assert err <= 1e-4 * scale, f"official-style copy differs from the TEDAdapter: max error {err:.3g}"
        return model

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        bt, length, dim = x.shape
        frames = self.num_frames
        batch, r = bt // frames, self.conv.in_channels
        side = round(math.sqrt(length - 1))
        grid = self.grid or (side, side)
        offset = self.offset_adapter(x, frames, grid)
        e = self.fc1(x)
        e = e.view(batch, frames, length, r).permute(0, 2, 3, 1).contiguous().view(batch * length, r, frames)
        e = self.conv(e)
        e = e.permute(0, 2, 1).contiguous().view(batch, length, frames, r)
        e = e.permute(0, 2, 1, 3).contiguous().view(bt, length, r)
        out = (x if residual is None else residual) + self.fc2(e)
        return torch.cat([out[:, :1], out[:, 1:] + offset], dim=1)


class OfficialStyleM2CLIP(M2CLIP):
    """M2CLIP computing the same losses the way the official release does (see the module docstring).

    Only the text side is overridden here; ``make_official_style`` also swaps the TED adapters and the
    attention modules. Token ids are built once per class list (the release tokenises its class prompts
    once, too): tokenising is not model work.
    """

    # The release's evaluation hands the vision tower all B·V views of a batch in one call (main.py's
    # ``data.flatten(0, 1)``); a benchmark may set chunks and workers to separate that choice from the model's
    # speed.
    clips_per_call: Optional[int] = None
    workers: int = 1

    def inference_clips_per_call(self, device: torch.device) -> Optional[int]:
        return self.clips_per_call

    def inference_workers(self, device: torch.device) -> int:
        return self.workers

    @staticmethod
    def _trim(tokens: torch.Tensor, used: int) -> torch.Tensor:
        return tokens  # all context_length columns, padding included (CMLM prompts too)

    def _frozen_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # Autograd stays on: the release runs its frozen text layers outside no_grad.
        return self._text_blocks(self._embed_tokens(tokens), 0, self.frozen_text_layers)

    def _prompt_tokens(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(class_names), tuple(templates))
        cache = self.__dict__.setdefault("_official_tokens", {})
        if key not in cache:
            cache.clear()
            cache[key] = torch.cat([self.prompts(class_names, t).tokens for t in templates])
        return cache[key].to(self.clip.token_embedding.weight.device)

    def encode_text(self, class_names: Optional[Sequence[str]] = None,
                    templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """open_clip's ``encode_text`` (every layer, ln_final on every row, EOT pooling, projection) on every
        prompt, then the mean over templates of the unit-norm embeddings, renormalised, as ``M2CLIP.encode_text``."""
        class_names = self.class_names if class_names is None else list(class_names)
        templates = tuple(templates or self.config.templates)
        tokens = self._prompt_tokens(class_names, templates)
        with self._autocast(tokens.device):
            emb = F.normalize(self.clip.encode_text(tokens), dim=-1)
        return F.normalize(emb.reshape(len(templates), len(class_names), -1).mean(dim=0), dim=-1)


def make_official_style(model: M2CLIP) -> OfficialStyleM2CLIP:
    """Turn ``model`` into the official-style baseline, in place, computing the same function from the same
    weights: every TED adapter is replaced by an ``OfficialStyleTEDAdapter`` copy of it (checked equal by
    ``from_ted``), attention goes back to nn.MultiheadAttention, the MLPs to open_clip's QuickGELU form, the
    last vision block runs on every token, the text cache and the end-of-text path are off, and the class
    becomes ``OfficialStyleM2CLIP`` (same attributes, official text encoding)."""
    for name, ted in list(model.ted_adapters.items()):
        model.swap_ted_adapter(name, OfficialStyleTEDAdapter.from_ted(ted))
    set_attention_backend(model, "torch")
    set_mlp_form(model, False)  # open_clip's QuickGELU MLP, as the official CLIP code runs it
    model.last_block_class_token_only = False  # the official last block runs on every token
    model.__class__ = OfficialStyleM2CLIP
    model.use_text_cache = False
    model.use_eot_text_path = False
    model._text_cache.clear()
    return model


def randomise_tunable(model: torch.nn.Module) -> None:
    """Give every trained parameter random values, the same in every process (seeded by its name):
    a fresh model's convs and several biases are zero, which would hide the adapters' math from the loss
    and gradient check. Matrices/kernels: N(0, 0.25/fan_in) (each adapter changes the residual stream by
    a fraction of itself, so 12 of them neither vanish nor blow up); vectors: their init plus N(0, 0.02²)
    (LayerNorm gains stay near 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * 0.5 / (p[0].numel() ** 0.5))
            else:
                p.add_(noise * 0.02)


def saved_storages(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Dict[int, int]:
    """{storage address: bytes} of what autograd saves for backward during run(), through
    saved_tensors_hooks; storages of ``exclude`` (the parameters, which live anyway) are left out and
    a storage saved twice counts once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved
