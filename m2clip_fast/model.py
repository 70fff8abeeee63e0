"""M2CLIP: a frozen open_clip model with TED adapters, a temporal adapter, text adapters and the
four-head multi-task decoder.

Adapters are attached to open_clip's own blocks; open_clip's forward code runs unchanged:
- before attention: a forward pre-hook on the block replaces its input x by adapter(x);
- before the MLP: the block's ``ls_1`` (the attention branch's LayerScale, Identity for CLIP) is wrapped
  by ``PreMLPTap``. The block computes ``x + ls_1(attn)``; the tap returns ``attn + update(x + attn)``,
  so the block yields adapter(x + attn) — exactly the official "adapter before MLP" — and a fresh
  (zero-update) adapter leaves every bit of CLIP's output unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import TEDAdapter, TemporalAdapter, TextAdapter
from .attention import set_attention_backend
from .cpu_workers import map_on_cores
from .errors import UsageError
from .fused import FusedTEDAdapter
from .heads import (HEADS, MLMHead, VisualClassifier, cmc_loss, cmlm_loss, kl_contrastive_loss, vc_loss)
from .mlp import set_mlp_form
from .presets import SHIPPED_BACKBONES, ConfigError, M2CLIPConfig, resolve_config, validate_config
from .runtime import gather_batch
from .text import PromptTokenizer, humanize, label_word_table, label_words, load_class_names, mask_words

# Tokens in the vision-tower calls in flight at inference on the CPU, all workers together (see
# M2CLIP.inference_clips_per_call): two 8-frame ViT-B/16 clips, one 16-frame clip. Measured on 2 cores with a
# 32 MB L3; a model's ``cpu_inference_tokens`` sets another budget (None: one call).
CPU_INFERENCE_TOKENS = 4096


# ----------------------------------------------------------------------------------------------- insertion
class PerThread:
    """An attribute whose value belongs to the thread that set it (None where that thread set none).

    Hooks hand tensors from one module to another within a forward (a block's input to its tap, the class
    token to encode_frames); forwards running at once on several threads (:func:`map_on_cores`) must each see
    their own. Setting None drops the thread's value."""

    def __set_name__(self, owner, name):
        self.slot = f"_{name}_per_thread"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj.__dict__.get(self.slot, {}).get(threading.get_ident())

    def __set__(self, obj, value) -> None:
        values = obj.__dict__.setdefault(self.slot, {})
        if value is None:
            values.pop(threading.get_ident(), None)
        else:
            values[threading.get_ident()] = value


class PreMLPTap(nn.Module):
    """Stands in for a block's ``ls_1`` to run an adapter between the attention and MLP residuals.

    ``block_input`` is set by the block's forward pre-hook just before ``ls_1`` runs. The adapter is held
    by reference, not as a child: the model owns (and checkpoints) it once, under its own name.
    """

    block_input = PerThread()

    def __init__(self, inner: nn.Module, adapter: nn.Module):
        super().__init__()
        self.inner = inner
        self.__dict__["adapter"] = adapter
        self.recorded: Optional[torch.Tensor] = None  # the adapter's input, kept when ``record`` is on
        self.record = False

    def forward(self, attn_out: torch.Tensor) -> torch.Tensor:
        y = self.inner(attn_out)
        x, self.block_input = self.block_input, None
        if x is None:
            raise RuntimeError("PreMLPTap ran without its block's pre-hook; was ls_1 called outside the block?")
        if self.record:
            self.recorded = x + y
        return self.adapter(x + y, residual=y)


class _AdapterPreHook:
    """Block forward pre-hook: applies the pre-attention adapter and hands the block input to the tap.
    A callable object rather than a closure so ``copy.deepcopy(model)`` rebinds it to the copied adapters."""

    def __init__(self, pre_attn: Optional[nn.Module], tap: Optional[PreMLPTap]):
        self.pre_attn, self.tap = pre_attn, tap

    def __call__(self, module, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        else:
            x, rest = kwargs.pop("q_x"), ()
        if self.pre_attn is not None:
            x = self.pre_attn(x)
        if self.tap is not None:
            self.tap.block_input = x
        return (x, *rest), kwargs


def alias_kv_norm(block: nn.Module) -> None:
    """Let ``block`` normalise keys/values apart from its queries, as open_clip's blocks do when they have an
    ``ln_1_kv``: with ln_1 itself, as an alias kept out of the module tree, so the state_dict does not change.

    Checkpoints of the CMLM block written while the alias was a registered submodule hold ln_1's weights a
    second time under ``ln_1_kv.*``; loading drops them (they are ln_1's own)."""
    block.__dict__["ln_1_kv"] = block.ln_1
    block._register_load_state_dict_pre_hook(_drop_kv_norm_alias)


def _drop_kv_norm_alias(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "ln_1_kv.")]:
        del state_dict[key]


class _ClassTokenQueriesHook:
    """Forward pre-hook for the last vision block, registered after its adapter hook (hooks run in order).

    After the last block only the class token is read (ln_post, then the class-token pool), so only its
    row needs an attention query, the MLP and the pre-MLP adapter: the block gets queries x[:, :1] and
    keys / values x, and returns (B·T, 1, C). Exactly the rows the full block computes for the class
    token, for about 1/L of its MLP and adapter work; ``enabled = False`` runs the full block.
    """

    def __init__(self, block: nn.Module, tap: Optional[PreMLPTap]):
        alias_kv_norm(block)
        self.tap, self.enabled = tap, True

    def __call__(self, module, args, kwargs):
        if not self.enabled:
            return args, kwargs
        x, rest = (args[0], list(args[1:])) if args else (kwargs.pop("q_x"), [])
        if self.tap is not None:
            self.tap.block_input = self.tap.block_input[:, :1]
        if len(rest) >= 2:  # k_x, v_x passed positionally (open_clip's gradient checkpointing does)
            rest[0] = rest[1] = x
        else:
            kwargs = {**kwargs, "k_x": x, "v_x": x}
        return (x[:, :1], *rest), kwargs


def attach_adapters(block: nn.Module, pre_attn: Optional[nn.Module] = None,
                    pre_mlp: Optional[nn.Module] = None) -> Optional["_AdapterPreHook"]:
    """Insert adapters into an open_clip ResidualAttentionBlock without touching its forward code.
    The caller keeps ownership of the adapter modules (register them elsewhere). Returns the block's hook,
    through which the adapters can later be swapped."""
    if pre_attn is None and pre_mlp is None:
        return None
    if not hasattr(block, "ls_1"):
        raise TypeError(f"{type(block).__name__} has no ls_1; only open_clip ResidualAttentionBlocks are supported")
    tap = None
    if pre_mlp is not None:
        tap = PreMLPTap(block.ls_1, pre_mlp)
        block.ls_1 = tap
    hook = _AdapterPreHook(pre_attn, tap)
    block.register_forward_pre_hook(hook, with_kwargs=True)
    return hook


# ---------------------------------------------------------------------------------------------- open_clip
def _register_shipped_backbones() -> None:
    import open_clip
    from importlib import resources

    for name in SHIPPED_BACKBONES:
        if name not in open_clip.list_models():
            open_clip.add_model_config(Path(str(resources.files("m2clip_fast.assets").joinpath(f"{name}.json"))))


def load_clip(backbone: str, pretrained: Optional[str], quick_gelu: bool) -> nn.Module:
    """An open_clip CLIP model. ``pretrained``: an open_clip tag ("openai"), a local checkpoint, or None."""
    import open_clip

    _register_shipped_backbones()
    if backbone not in open_clip.list_models() and not backbone.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"unknown backbone {backbone!r}: not an open_clip model name (python -c 'import open_clip; "
                         f"print(open_clip.list_models())' lists them)")
    if pretrained is not None and not Path(pretrained).exists():
        known = open_clip.list_pretrained_tags_by_model(backbone)
        if pretrained not in known:
            raise UsageError(
                f"pretrained={pretrained!r} is neither a local file nor an open_clip tag of {backbone} ({known})"
            )
    clip = open_clip.create_model(backbone, pretrained=pretrained, force_quick_gelu=quick_gelu)
    if not hasattr(clip, "visual") or not hasattr(clip, "transformer"):
        raise TypeError(f"{backbone} is not a CLIP with a ViT visual tower and a text transformer")
    return clip


def _ted_factory(config: M2CLIPConfig, width: int, grid: Tuple[int, int]):
    """A maker of the config's TED adapters. FusedTEDAdapter always imports (it chooses a backend per call
    and falls back to the reference path itself), so there is no import failure to handle here."""
    kwargs = dict(dim=width, bottleneck=config.ted_bottleneck, num_frames=config.num_frames, grid=grid,
                  enhance=config.ted_enhance, difference=config.ted_difference)
    if config.fused:
        return lambda: FusedTEDAdapter(**kwargs)
    return lambda: TEDAdapter(**kwargs)


# ---------------------------------------------------------------------------------------------- the model
class M2CLIP(nn.Module):
    """M²-CLIP on an open_clip backbone.

    Inputs: video float (B, T, 3, H, W), normalised with the backbone's mean/std, T = ``num_frames``,
    H = W = ``image_size``; labels int64 (B,) in [0, C).
    """

    _pre_norm_class_token = PerThread()  # ln_post's input, kept by _capture_class_token

    def __init__(self, clip: nn.Module, config: M2CLIPConfig, tokenizer, class_names: Sequence[str]):
        super().__init__()
        self.config = config
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        visual = clip.visual
        self.num_frames = config.num_frames
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) and size[0] == size[1] else size
        patch = visual.patch_size
        self.grid = (visual.grid_size[0], visual.grid_size[1]) if hasattr(visual, "grid_size") else (
            size[0] // patch[0], size[1] // patch[1])
        width = visual.transformer.width
        embed_dim = clip.text_projection.shape[-1] if isinstance(clip.text_projection, torch.Tensor) \
            else clip.text_projection.out_features
        text_width = clip.transformer.width

        # vision: TED adapters in the last ted_layers blocks
        vblocks = visual.transformer.resblocks
        self.ted_adapters = nn.ModuleDict()
        self._ted_hooks: Dict[str, _AdapterPreHook] = {}
        if config.ted_adapters:
            if not 0 < config.ted_layers <= len(vblocks):
                raise UsageError(f"ted_layers={config.ted_layers} but the vision tower has {len(vblocks)} blocks")
            make = _ted_factory(config, width, self.grid)
            for i in range(len(vblocks) - config.ted_layers, len(vblocks)):
                pre_attn = make() if config.ted_pre_attn else None
                pre_mlp = make() if config.ted_pre_mlp else None
                hook = attach_adapters(vblocks[i], pre_attn, pre_mlp)
                for where, adapter in (("pre_attn", pre_attn), ("pre_mlp", pre_mlp)):
                    if adapter is not None:
                        self.ted_adapters[f"{i}_{where}"] = adapter
                        self._ted_hooks[f"{i}_{where}"] = hook
        self._vision_taps = [b.ls_1 for b in vblocks if isinstance(b.ls_1, PreMLPTap)]
        self._class_token_queries = None
        if getattr(visual, "pool_type", "tok") == "tok" and getattr(visual, "attn_pool", None) is None:
            last = vblocks[-1]
            tap = last.ls_1 if isinstance(last.ls_1, PreMLPTap) else None
            self._class_token_queries = _ClassTokenQueriesHook(last, tap)
            last.register_forward_pre_hook(self._class_token_queries, with_kwargs=True)
        self.temporal_adapter = (TemporalAdapter(embed_dim, embed_dim // 2, config.num_frames)
                                 if config.temporal_adapter else None)
        visual.ln_post.register_forward_hook(self._capture_class_token)

        # text: adapters (pre-MLP) in the last text_adapter_layers blocks; everything before is cached
        tblocks = clip.transformer.resblocks
        if not 0 <= config.text_adapter_layers <= len(tblocks):
            raise UsageError(f"text_adapter_layers={config.text_adapter_layers}, text tower has {len(tblocks)} blocks")
        # CMLM's cross-attention block: a frozen copy of the last text block taken before adapters go in,
        # made cross-attention by giving it its ln_1 for keys/values too.
        self.cmlm_block = copy.deepcopy(tblocks[-1]) if config.cmlm else None
        self.text_adapters = nn.ModuleDict()
        self.frozen_text_layers = len(tblocks) - config.text_adapter_layers
        for i in range(self.frozen_text_layers, len(tblocks)):
            self.text_adapters[str(i)] = TextAdapter(text_width, config.text_bottleneck)
            attach_adapters(tblocks[i], pre_mlp=self.text_adapters[str(i)])

        # heads
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        w = config.loss_weights
        unknown = set(w) - set(HEADS)
        if unknown:
            raise ConfigError(f"unknown heads in loss_weights: {sorted(unknown)}; heads are {HEADS}")
        self.loss_weights = {h: float(w.get(h, 0.0)) for h in HEADS}
        self.vc_head = VisualClassifier(width, self.num_classes, config.vc_dropout)
        self.prompts = PromptTokenizer(tokenizer, clip.context_length)
        self.vocabulary = label_words(self.class_names)
        self._word_index = {word: i for i, word in enumerate(self.vocabulary)}
        if config.cmlm:
            if embed_dim != text_width:
                raise UsageError(f"CMLM cross-attends text (width {text_width}) to frame embeddings "
                                 f"(dim {embed_dim}); they must match")
            alias_kv_norm(self.cmlm_block)
            for p in self.cmlm_block.parameters():
                p.requires_grad_(False)
            self.cmlm_adapter = TextAdapter(text_width, config.text_bottleneck)
            attach_adapters(self.cmlm_block, pre_mlp=self.cmlm_adapter)
            self.mlm_head = MLMHead(text_width, len(self.vocabulary))
            wordless = [n for n in self.class_names if not humanize(n).split()]
            if wordless:
                warnings.warn(f"class names without any word get no CMLM target: {wordless[:5]}")
        self._cmlm_on_device: Dict[torch.device, Tuple[torch.Tensor, ...]] = {}  # see _cmlm_table
        self._text_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.use_text_cache = True
        self.use_eot_text_path = True
        self.cpu_inference_tokens: Optional[int] = CPU_INFERENCE_TOKENS  # see inference_clips_per_call
        self.cpu_inference_workers: Optional[int] = None  # see inference_workers

    @property
    def last_block_class_token_only(self) -> bool:
        """True (default): the last vision block computes the class-token rows only (see _ClassTokenQueriesHook)."""
        return self._class_token_queries is not None and self._class_token_queries.enabled

    @last_block_class_token_only.setter
    def last_block_class_token_only(self, value: bool) -> None:
        if self._class_token_queries is None:
            if value:
                raise ValueError("this backbone does not pool the class token; its last block must run in full")
            return
        self._class_token_queries.enabled = bool(value)

    def unused_parameters(self) -> List[str]:
        """Tunable parameters that no training forward of this configuration gives a gradient: DDP must be told
        (find_unused_parameters), or it waits for their gradients and fails at the next step.

        * a head of loss weight 0 is not run: the VC head with ``vc`` 0; the text adapters with ``contrastive``,
          ``cmc`` and ``cmlm`` all 0 (only those heads run the text encoder), and the temporal adapter too
          (only they read the per-frame embeddings; VC reads the class tokens before it);
        * the last block's pre-MLP D branch when that block computes the class token only (the branch writes
          patch rows nobody reads; the official model trains it on zero gradients). Kept so official
          checkpoints load."""
        w = self.loss_weights
        unused_modules = []
        if not w["vc"]:
            unused_modules.append("vc_head")
        if not (w["contrastive"] or w["cmc"] or w["cmlm"]):
            unused_modules += ["text_adapters", "temporal_adapter"]
        last = f"{len(self.clip.visual.transformer.resblocks) - 1}_pre_mlp"
        if self.last_block_class_token_only and getattr(self.ted_adapters[last] if last in self.ted_adapters
                                                        else None, "difference", False):
            d_branch = {n for n, _ in self.ted_adapters[last].named_parameters() if n.split(".")[0].endswith("_d")}
            unused_modules += [f"ted_adapters.{last}.{n}" for n in sorted(d_branch)]
        return [n for n, p in self.named_parameters() if p.requires_grad
                and any(n == m or n.startswith(m + ".") for m in unused_modules)]

    def swap_ted_adapter(self, name: str, adapter: nn.Module) -> None:
        """Replace the TED adapter ``name`` (a key of ``ted_adapters``, e.g. "11_pre_mlp") by another module
        with the same call signature, e.g. to compare implementations inside the same model."""
        hook = self._ted_hooks[name]
        self.ted_adapters[name] = adapter
        if name.endswith("pre_attn"):
            hook.pre_attn = adapter
        else:
            hook.tap.__dict__["adapter"] = adapter

    # ------------------------------------------------------------------------------------------ vision
    def _capture_class_token(self, module, args, output):
        x = args[0]
        self._pre_norm_class_token = x[:, 0] if x.dim() == 3 else x

    def check_video(self, video: torch.Tensor) -> None:
        """Raise a clear error unless video is float (B, num_frames, 3, image_size, image_size)."""
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.dim() != 5:
            raise ValueError(f"video must have shape (B, T, 3, H, W), got rank {video.dim()} {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be a normalised floating-point tensor, got dtype {video.dtype} "
                            "(convert uint8 frames with m2clip_fast.data transforms)")
        _, t, c, h, w = video.shape
        if t != self.num_frames:
            raise ValueError(f"video has {t} frames but the model was built for num_frames={self.num_frames}")
        size = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * 2
        if c != 3 or (h, w) != tuple(size):
            raise ValueError(f"video frames are {c}x{h}x{w}, expected 3x{size[0]}x{size[1]}")

    def encode_frames(self, video: torch.Tensor, clips_per_call: Optional[int] = None, workers: int = 1
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, H, W) → (per-frame embeddings (B, T, D) after the temporal adapter,
        ln_post of the time-averaged class token (B, width)). ``clips_per_call``: run the vision tower on at
        most that many clips at a time (clips never mix, so the result is the same up to GEMM blocking);
        None: all at once. ``workers``: run those calls on up to that many threads side by side, each with its
        share of torch's threads (:func:`~m2clip_fast.cpu_workers.map_on_cores`); 1: one after another."""
        self.check_video(video)
        if clips_per_call is not None and clips_per_call < 1:
            raise ValueError(f"clips_per_call must be at least 1, got {clips_per_call}")
        if clips_per_call is not None and clips_per_call < video.shape[0]:
            parts = map_on_cores(self.encode_frames, video.split(int(clips_per_call)), workers)
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        b, t = video.shape[:2]
        try:
            frames = self.clip.visual(video.flatten(0, 1).to(self._visual_dtype()))
            class_tokens, self._pre_norm_class_token = self._pre_norm_class_token, None
            if self.temporal_adapter is not None:
                frames = self.temporal_adapter(frames, t)
            pooled = self.clip.visual.ln_post(class_tokens.reshape(b, t, -1).mean(dim=1))
        finally:
            # the ln_post call went through the capture hook too, and a forward that failed may have left a
            # block's input in its tap: drop what this thread left, so that the model holds no activation
            # (nor, through it, the autograd graph of the whole forward) once this call returns
            self._pre_norm_class_token = None
            for tap in self._vision_taps:
                tap.block_input = None
        return frames.reshape(b, t, -1), pooled

    def encode_frames_for_inference(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_frames` as inference runs it on ``video``'s device: in calls of
        :meth:`inference_clips_per_call` clips, :meth:`inference_workers` of them side by side."""
        device = video.device
        return self.encode_frames(video, self.inference_clips_per_call(device), self.inference_workers(device))

    def inference_workers(self, device: torch.device) -> int:
        """How many vision-tower calls inference runs side by side on ``device``. On the CPU
        ``cpu_inference_workers``, by default (None) ``torch.get_num_threads()``: one call per thread, each
        single-threaded, which ran k400_b16_8f's evaluation 1.10× faster than the same calls one after another
        on both threads (2 Zen 3 cores; see :mod:`~m2clip_fast.cpu_workers`). Elsewhere (CUDA): 1."""
        if device.type != "cpu":
            return 1
        threads, workers = torch.get_num_threads(), self.cpu_inference_workers
        return max(1, threads if workers is None else min(int(workers), threads))

    def inference_clips_per_call(self, device: torch.device) -> Optional[int]:
        """How many clips each inference call (``predict``, ``extract``, ``encode_video`` without autograd)
        hands the vision tower on ``device``.

        On the CPU every elementwise pass (LayerNorm, residual adds, the MLP activation) streams the whole
        call's activations: 12 views of 8 frames are 18,912 tokens, a 232 MB fp32 MLP hidden, far beyond the
        last-level cache, where two clips' 39 MB mostly stay in it. Calls of about CPU_INFERENCE_TOKENS
        tokens in all (split between the :meth:`inference_workers` calls in flight) ran k400_b16_8f's 12-view
        evaluation 1.2–1.3× faster than one call on 2 Zen 3 cores (32 MB L3), with the same GEMM rate.
        ``cpu_inference_tokens`` (default CPU_INFERENCE_TOKENS) sets the budget for another machine; None turns
        chunking off. Elsewhere (CUDA): None, everything in one call."""
        if device.type != "cpu" or self.cpu_inference_tokens is None:
            return None
        tokens = self.num_frames * (1 + self.grid[0] * self.grid[1])
        return max(1, int(self.cpu_inference_tokens) // (tokens * self.inference_workers(device)))

    def _visual_dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) → video embedding (B, D): the mean over T of the per-frame embeddings. Without
        autograd (inference), in the chunks of :meth:`inference_clips_per_call`."""
        with self._autocast(video.device):
            if torch.is_grad_enabled():
                return self.encode_frames(video)[0].mean(dim=1)
            return self.encode_frames_for_inference(video)[0].mean(dim=1)

    # -------------------------------------------------------------------------------------------- text
    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, n) token ids → (N, n, width) token + positional embeddings."""
        clip = self.clip
        x = clip.token_embedding(tokens)
        return x + clip.positional_embedding[: tokens.shape[1]].to(x.dtype)

    def _text_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        n = x.shape[1]
        mask = self.clip.attn_mask[:n, :n] if self.clip.attn_mask is not None else None
        for block in self.clip.transformer.resblocks[start:stop]:
            x = block(x, attn_mask=mask)
        return x

    @staticmethod
    def _trim(tokens: torch.Tensor, used: int) -> torch.Tensor:
        """Drop the all-padding columns from ``used`` on. Exact under the causal mask: no position attends forward."""
        return tokens[:, :used]

    def _frozen_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen text blocks, (N, n, width); no autograd graph."""
        with torch.no_grad():
            return self._text_blocks(self._embed_tokens(tokens), 0, self.frozen_text_layers)

    def _adapted_text(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._text_blocks(hidden, self.frozen_text_layers, len(self.clip.transformer.resblocks))

    def _project_text(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, n, width) last hidden states → (N, D): pool the end-of-text row, ln_final, projection."""
        from open_clip.transformer import text_global_pool

        x = text_global_pool(hidden, tokens, getattr(self.clip, "text_pool_type", "argmax"),
                             eos_token_id=getattr(self.clip, "text_eos_id", None))
        return self._project_pooled(x)

    def _project_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, width) → (N, D). ln_final is per token, so pooling before it is the same as after."""
        x = self.clip.ln_final(x)
        proj = self.clip.text_projection
        return x @ proj if isinstance(proj, torch.Tensor) else proj(x)

    def _eot_tap(self) -> Optional[PreMLPTap]:
        """The last text block's tap when only the end-of-text rows of that block need computing each step:
        a single adapted text layer, adapter before the MLP (its attention stays frozen) and argmax pooling."""
        last = self.clip.transformer.resblocks[-1]
        tap = getattr(last, "ls_1", None)
        if (self.config.text_adapter_layers == 1 and isinstance(tap, PreMLPTap)
                and getattr(self.clip, "text_pool_type", "argmax") == "argmax"):
            return tap
        return None

    def _frozen_text_state(self) -> Tuple:
        """(storage, version) of every frozen tensor the cached text states are computed from. Every in-place
        write (``load_state_dict``, an optimizer step, ``copy_``) bumps a tensor's version, so a cache entry
        made before it no longer matches. (Writes through ``.data`` are invisible to version counters: call
        ``clear_text_cache()`` after those.)"""
        clip = self.clip
        tensors = [clip.token_embedding.weight, clip.positional_embedding, *clip.transformer.parameters()]
        if isinstance(getattr(clip, "attn_mask", None), torch.Tensor):
            tensors.append(clip.attn_mask)
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def clear_text_cache(self) -> None:
        """Forget the cached frozen-text states (they are recomputed on the next ``encode_text``)."""
        self._text_cache.clear()

    def _class_prompt_states(self, class_names: Sequence[str], templates: Sequence[str]):
        """Tokens (P·C, n) and what the frozen text layers give for every (template, class) prompt, cached
        until the class list, templates, device, dtype, autocast state or any frozen text weight change: the
        hidden states after the frozen blocks (P·C, n, width) or, on the end-of-text path, the last block's
        adapter input at the EOT rows (P·C, width). The text adapters come after what is cached, so training
        them never makes the cache stale."""
        device, dtype = self.clip.token_embedding.weight.device, self.clip.token_embedding.weight.dtype
        tap = self._eot_tap() if self.use_eot_text_path else None
        autocast = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None)
        key = (tuple(class_names), tuple(templates), device, dtype, autocast, tap is not None,
               self._frozen_text_state())
        if self.use_text_cache and key in self._text_cache:
            return self._text_cache[key]
        built = [self.prompts(class_names, t) for t in templates]
        tokens = self._trim(torch.cat([p.tokens for p in built]), max(p.used for p in built)).to(device)
        hidden = self._frozen_text(tokens)
        if tap is not None:
            tap.record = True
            try:
                with torch.no_grad():
                    self._adapted_text(hidden)
                hidden = tap.recorded[torch.arange(len(tokens), device=device), tokens.argmax(dim=-1)]
            finally:
                tap.record, tap.recorded = False, None
        states = (tokens, hidden)
        if self.use_text_cache:
            self._text_cache = {key: states}  # one entry: a new class list replaces the old one
        return states

    def _eot_text(self, mid: torch.Tensor) -> torch.Tensor:
        """The last text block on EOT rows only: adapter, then the block's frozen MLP residual. (N, width)."""
        block = self.clip.transformer.resblocks[-1]
        x = block.ls_1.adapter(mid)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def encode_text(self, class_names: Optional[Sequence[str]] = None,
                    templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Class-name texts → (C, D) unit-norm embeddings: the mean over templates of the unit-norm prompt
        embeddings, normalised again (CLIP's prompt ensembling; a mean of unit vectors is shorter than 1, by a
        different amount per class, which would bias every cosine-similarity score)."""
        class_names = self.class_names if class_names is None else list(class_names)
        templates = tuple(templates or self.config.templates)
        with self._autocast(self.clip.token_embedding.weight.device):
            tokens, hidden = self._class_prompt_states(class_names, templates)
            if hidden.dim() == 2:  # end-of-text path: already pooled
                emb = self._project_pooled(self._eot_text(hidden))
            else:
                emb = self._project_text(self._adapted_text(hidden), tokens)
            emb = F.normalize(emb, dim=-1)
        emb = emb.reshape(len(templates), len(class_names), -1)
        return emb[0] if len(templates) == 1 else F.normalize(emb.mean(dim=0), dim=-1)

    # ------------------------------------------------------------------------------------------- heads
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.float().exp()

    def _similarity_logits(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """logit_scale · cos(v_i, t_j), (B, D) × (C, D) → (B, C), in fp32 also under autocast: in bf16 a logit of
        100·cos would keep under three significant digits (steps of 0.1 to 0.5), enough to flip close classes."""
        with torch.autocast(v.device.type, enabled=False):
            v, t = F.normalize(v.float(), dim=-1), F.normalize(t.float(), dim=-1)
            return self.logit_scale * v @ t.t()

    def _cmlm_class_table(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every class's CMLM prompt, on the host: tokens (C, n) trimmed to the longest prompt (exact: the text
        tower is causal, the CMLM block attends to frames only and the MLM loss reads masked positions only),
        label-word spans (C, W, 3) and mask counts (C,) (see :class:`m2clip_fast.text.LabelWordTable`)."""
        prompts = self.prompts(self.class_names, self.config.templates[0])
        words = [[self._word_index[w] for w in humanize(n).split()] for n in self.class_names]
        table = label_word_table(prompts, words, self.config.mask_ratio)
        return self._trim(prompts.tokens, prompts.used), table.spans, table.counts

    def _cmlm_table(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """The class table on ``device``, built and copied there on first use: a step then only indexes it
        by its labels."""
        if device not in self._cmlm_on_device:
            self._cmlm_on_device[device] = tuple(t.to(device) for t in self._cmlm_class_table())
        return self._cmlm_on_device[device]

    def _cmlm_logits(self, labels: torch.Tensor, frames: torch.Tensor):
        """Mask label words of each sample's prompt and predict them from text cross-attending to frames.
        Returns (logits (B, n, V), targets (B, n)). Runs on the device: no host round trip for the labels."""
        tokens, spans, counts = (t[labels] for t in self._cmlm_table(self.clip.token_embedding.weight.device))
        tokens, targets = mask_words(tokens, spans, counts, self.prompts.mask_token)
        hidden = self._adapted_text(self._frozen_text(tokens))
        frames = frames.to(hidden.dtype)
        hidden = self.cmlm_block(hidden, k_x=frames, v_x=frames)
        return self.mlm_head(self.clip.ln_final(hidden)), targets.to(frames.device)

    def forward(self, video: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Training step: returns {'loss': weighted sum, and one loss per active head}."""
        with self._autocast(video.device):
            return self._losses(video, labels)

    def _losses(self, video: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        if labels.dim() != 1 or labels.shape[0] != video.shape[0]:
            raise ValueError(f"labels must be shape ({video.shape[0]},), got {tuple(labels.shape)}")
        # Checked on the device, without waiting for it (the datasets check every label when they load):
        # a CPU tensor raises here, a CUDA one fails the step with a device-side assert.
        torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                            f"labels must lie in [0, {self.num_classes})")
        frames, pooled = self.encode_frames(video)
        out: Dict[str, torch.Tensor] = {}
        w = self.loss_weights
        if w["contrastive"] or w["cmc"]:
            v = F.normalize(frames.mean(dim=1).float(), dim=-1)
            t = self.encode_text()
            if w["cmc"]:
                out["cmc"] = cmc_loss(self._similarity_logits(v, t), labels)  # (B, C)
            if w["contrastive"]:
                # Under DDP the contrast spans the global batch, so N processes train like one.
                v_all, labels_all = gather_batch(v), gather_batch(labels)
                out["contrastive"] = kl_contrastive_loss(self._similarity_logits(v_all, t[labels_all]), labels_all)
        if w["vc"]:
            out["vc"] = vc_loss(self.vc_head(pooled), labels)
        if w["cmlm"]:
            out["cmlm"] = cmlm_loss(*self._cmlm_logits(labels, frames))
        out["loss"] = sum(w[k] * v for k, v in out.items())
        return out

    @torch.no_grad()
    def predict(self, video: torch.Tensor, class_names: Optional[Sequence[str]] = None,
                templates: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Class probabilities (B, C): 'text' (cosine to class texts), 'vc' (linear head; only for the training
        classes) and 'fused' (their average, or 'text' alone for another class list: zero-shot)."""
        with self._autocast(video.device):
            return self._predict(video, class_names, templates)

    def _predict(self, video, class_names, templates) -> Dict[str, torch.Tensor]:
        frames, pooled = self.encode_frames_for_inference(video)
        t = self.encode_text(class_names, templates)
        out = {"text": self._similarity_logits(frames.mean(dim=1), t).softmax(dim=-1)}
        same_classes = class_names is None or list(class_names) == self.class_names
        if same_classes:
            out["vc"] = self.vc_head(pooled).float().softmax(dim=-1)
            out["fused"] = 0.5 * (out["text"] + out["vc"])
        else:
            out["fused"] = out["text"]
        return out

    # -------------------------------------------------------------------------------------- precision
    @property
    def crop_size(self) -> int:
        """The side of the square frames the clip loaders make for this model: ``image_size``, or the height
        of a non-square one."""
        return self.image_size if isinstance(self.image_size, int) else self.image_size[0]

    def set_backbone_dtype(self, dtype: torch.dtype) -> "M2CLIP":
        """Cast the frozen weights (CLIP and the CMLM block) to ``dtype``; adapters and heads keep fp32
        master weights, and so does CLIP's scalar temperature (bf16 would turn logit scale 100 into 98.9).
        The model's entry points then run under autocast to ``dtype``."""
        scale = self.clip.logit_scale.detach().float().clone()
        self.clip.to(dtype)
        self.clip.logit_scale.data = scale
        if self.cmlm_block is not None:
            self.cmlm_block.to(dtype)
        self._text_cache.clear()
        return self

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.clip.token_embedding.weight.dtype

    def _autocast(self, device: torch.device):
        """Autocast to the backbone dtype when it is low precision and the caller has not set autocast."""
        dtype = self.backbone_dtype
        if dtype not in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()  # autocast(enabled=False) would switch off the caller's autocast
        return torch.autocast(device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------- parameters
    def tunable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained parameters (what a checkpoint needs on top of the open_clip weights)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen backbone: no dropout / patch dropout from CLIP itself
        if self.cmlm_block is not None:
            self.cmlm_block.eval()  # a frozen copy of CLIP's last text block, as frozen as the rest
        return self


def create_model(preset_or_config: Union[str, M2CLIPConfig] = "k400_b16_8f", pretrained: Optional[str] = None,
                 class_names: Optional[Union[str, Sequence[str]]] = None, **overrides) -> M2CLIP:
    """Build an M2CLIP.

    preset_or_config: a preset name (``k400_b16_8f``, ``ssv2_b16_8f``, ``demo``, ``tiny``) or an M2CLIPConfig.
    pretrained: an open_clip tag ("openai"), a local checkpoint path, or None (random init; offline tests).
    class_names: overrides the config's class list (a shipped list name, a file, or a sequence).
    overrides: M2CLIPConfig fields, e.g. ``num_frames=16, fused=False``.
    """
    import open_clip

    if isinstance(preset_or_config, M2CLIPConfig):
        config = copy.deepcopy(preset_or_config)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ConfigError(f"unknown config key {key!r}")
            setattr(config, key, value)
        validate_config(config)
    else:
        config = resolve_config(preset_or_config, overrides=overrides)
    if class_names is not None:
        config.class_names = class_names if isinstance(class_names, str) else tuple(class_names)
    if config.class_names is None:
        raise UsageError("this preset has no class list: pass class_names=[...] or a class-name file")
    names = load_class_names(config.class_names)
    clip = load_clip(config.backbone, pretrained, config.quick_gelu)
    tokenizer = open_clip.get_tokenizer(config.backbone)
    model = M2CLIP(clip, config, tokenizer, names)
    set_attention_backend(model, config.attention)  # vision, text and the CMLM cross-attention block
    set_mlp_form(model, config.fused)  # fused: every QuickGELU MLP in SiLU form (same weights, see mlp.py)
    return model
