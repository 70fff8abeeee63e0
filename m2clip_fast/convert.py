"""Official M²-CLIP checkpoints → ours: one TED adapter, or a whole training checkpoint.

One adapter: the official ``Adapter2`` names its E branch ``fc1 → conv (Conv1d over T) → fc2`` and its
D branch ``offset_adapter.{fc1, conv, fc2}`` with a Conv3d of kernel (1, 3, 3); our names are
``down_e / conv_e / up_e`` and ``down_d / conv_d / up_d`` with a Conv2d. The math is the same (see
``TEDAdapter``), so conversion is a rename plus dropping the Conv3d's unit time axis.

A whole checkpoint: the official ``main.py`` saves ``{"model": state}`` holding only the parameters
whose name contains "adapter" (everything it trains); :func:`load_official_checkpoint` maps each of
them onto an ``M2CLIP`` built with the matching preset:

=============================================================  ===================================
official                                                       ours
=============================================================  ===================================
visual.transformer.resblocks.{i}.adapter_pre_{attn,mlp}.*      ted_adapters.{i}_pre_{attn,mlp}.*
visual.t_adapter.{fc1,conv,fc2}.*                              temporal_adapter.{down,conv,up}.*
visual.adapter_fc.*                                            vc_head.fc.*
transformer.resblocks.{j}.adapter_pre_mlp.textad_fc{1,2}.*     text_adapters.{j}.{down,up}.*
transformer.resblocks.{L}.adapter_pre_mlp.* (L = text layers)  cmlm_adapter.* (the cross block)
mlm_adapter.transform.{dense,LayerNorm}.*                      mlm_head.{dense,norm}.*
mlm_adapter.decoder.weight, mlm_adapter.bias                   mlm_head.decoder.* (rows by word)
=============================================================  ===================================

The MLM decoder's rows are indexed by the official label-word file (``k400_mlm_lables.txt``: "word
index" per line); ours by :func:`m2clip_fast.text.label_words`. Rows are matched by word when that
file is given; without it the MLM head keeps its initialisation and the report says so (it is only
used in training). ``python -m m2clip_fast.convert`` writes the result as an m2clip-fast checkpoint
that ``python -m m2clip_fast.evaluate --checkpoint`` reads.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .adapters import ted_param_shapes
from .checkpoint import TRUST_HELP, atomic_save, build_checkpoint, load_checkpoint_file
from .cli import run_main
from .errors import UserError
from .text import OFFICIAL_TEMPLATES

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


class ConversionError(UserError, ValueError):
    """An official checkpoint or adapter state that does not convert (wrong file, shapes, keys or labels)."""


def _expected_shapes(dim: int, r: int, kt: int, ks: int, official: bool) -> Dict[str, Tuple[int, ...]]:
    """Shapes under our keys for width C = dim, bottleneck r, kernels kt (time) and ks (space); the official
    D conv is a Conv3d with a time kernel of 1: (r, 1, 1, ks, ks)."""
    shapes = ted_param_shapes(dim, r, kt, ks)
    if official:
        shapes["conv_d.weight"] = (r, 1, 1, ks, ks)
    return shapes


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
        raise ConversionError(f"inconsistent adapter shapes (C={dim}, r={r}, kernels {kt}/{ks}): " + "; ".join(wrong))
    if kt % 2 == 0 or ks % 2 == 0:
        raise ConversionError(f"conv kernels must be odd, got temporal {kt} and spatial {ks}")


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
    ours = _rename(state, _KEY_MAP, f"official {prefix}*" if prefix else "official")
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


# --------------------------------------------------------------------------------------------------
# whole checkpoints

_TEMPORAL_ADAPTER = {"fc1": "down", "conv": "conv", "fc2": "up"}
_TEXT_ADAPTER = {"textad_fc1": "down", "textad_fc2": "up"}
_MLM_TRANSFORM = {"transform.dense": "dense", "transform.LayerNorm": "norm"}
_VISION_ADAPTER = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.adapter_pre_(attn|mlp)\.(.+)")
_TEXT_ADAPTER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.adapter_pre_(attn|mlp)\.(.+)")


@dataclass
class ConversionReport:
    """What :func:`convert_official_checkpoint` did with an official state dict."""

    converted: int = 0                                        # official tensors mapped onto ours
    ignored_frozen: int = 0                                   # backbone weights (ours come from `pretrained`)
    kept_initial: List[str] = field(default_factory=list)     # our tunable tensors the checkpoint did not set
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {self.converted} official tensors; ignored {self.ignored_frozen} frozen backbone tensors"]
        if self.kept_initial:
            lines.append(f"kept at initialisation: {', '.join(self.kept_initial)}")
        return "\n".join(lines + self.notes)


def read_mlm_labels(path: Union[str, Path]) -> Dict[str, int]:
    """The official label-word file ("word index" per line) as {word: row}."""
    words: Dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConversionError(f"{path}:{number}: expected 'word index', got {line!r}")
        words[parts[0].lower()] = int(parts[1])
    return words


def _official_model_state(checkpoint) -> Dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint ({"model": ...} or bare), DDP prefix removed."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ConversionError("not an official M²-CLIP checkpoint: expected a state dict or {'model': state dict}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _is_official_key(key: str) -> bool:
    """A key only the official M²-CLIP code writes: an adapter or head of the table in this module's docstring."""
    return bool(_VISION_ADAPTER.fullmatch(key) or _TEXT_ADAPTER_KEY.fullmatch(key)
                or key.startswith(("visual.t_adapter.", "visual.adapter_fc.", "mlm_adapter.")))


def _require_official_keys(checkpoint, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint with none of the official adapter/head keys: converting it would write a model
    at its random initialisation that evaluate scores without complaint (a plain CLIP, ours, a wrong file)."""
    if any(_is_official_key(k) for k in state):
        return
    found = sorted(state)
    hint = ""
    if isinstance(checkpoint, Mapping) and "config" in checkpoint and "class_names" in checkpoint:
        hint = " (it looks like an m2clip-fast checkpoint already: evaluate --checkpoint reads it as it is)"
    raise ConversionError(f"no official M²-CLIP keys found in {source}; is this an official checkpoint? It holds "
                     f"{len(found)} keys, e.g. {found[:4]}, and none like visual.adapter_fc.weight or "
                     f"visual.transformer.resblocks.N.adapter_pre_mlp.fc1.weight{hint}")


# Every key of the official MLM head ("decoder.weight" and "bias" are the decoder's rows, by label word).
_MLM_KEYS = tuple(f"mlm_adapter.{k}" for k in ("transform.dense.weight", "transform.dense.bias",
                                                "transform.LayerNorm.weight", "transform.LayerNorm.bias",
                                                "decoder.weight", "bias"))


def _require_complete_mlm_head(state: Mapping[str, torch.Tensor]) -> None:
    """A partial MLM head means a damaged file: refuse it whether or not its decoder rows would be used."""
    missing = [k for k in _MLM_KEYS if k not in state]
    if missing:
        raise KeyError(f"official checkpoint has mlm_adapter.* but lacks {', '.join(missing)}")


def _adapter_prefixes(state: Mapping[str, torch.Tensor], pattern: "re.Pattern") -> Dict[Tuple[str, str], str]:
    """{(block, "attn" | "mlp"): key prefix} of every adapter the pattern finds among the keys."""
    found = {}
    for key in state:
        m = pattern.fullmatch(key)
        if m:
            found[(m.group(1), m.group(2))] = key[: m.start(3)]
    return dict(sorted(found.items(), key=lambda item: (int(item[0][0]), item[0][1])))


def _rename_group(state: Mapping[str, torch.Tensor], prefix: str, names: Mapping[str, str],
                  target: str) -> Dict[str, torch.Tensor]:
    """Keys ``prefix + old + .weight/.bias`` → ``target + new + .weight/.bias``; every (old, param) must exist."""
    out = {}
    for old, new in names.items():
        for param in ("weight", "bias"):
            key = f"{prefix}{old}.{param}"
            if key not in state:
                raise KeyError(f"official checkpoint has {prefix}* but lacks {key}")
            out[f"{target}{new}.{param}"] = state[key]
    return out


def _mlm_rows(weight: torch.Tensor, bias: torch.Tensor, vocabulary: Sequence[str], official_words: Dict[str, int],
              initial_weight: torch.Tensor, initial_bias: torch.Tensor, report: ConversionReport):
    """Decoder rows reordered from the official word indices to our vocabulary's; unmatched rows keep ours."""
    if max(official_words.values()) >= weight.shape[0]:
        raise ConversionError(f"the MLM label file indexes row {max(official_words.values())}, but the checkpoint's "
                         f"decoder has {weight.shape[0]} rows: wrong label file for this checkpoint?")
    new_weight, new_bias = initial_weight.clone(), initial_bias.clone()
    unmatched = []
    for row, word in enumerate(vocabulary):
        if word in official_words:
            new_weight[row] = weight[official_words[word]]
            new_bias[row] = bias[official_words[word]]
        else:
            unmatched.append(word)
    dropped = sorted(set(official_words) - set(vocabulary))
    report.notes.append(f"MLM decoder: {len(vocabulary) - len(unmatched)} of {len(vocabulary)} words matched; "
                        f"ours only (kept at initialisation): {unmatched or 'none'}; "
                        f"official only (dropped): {dropped[:20] or 'none'}")
    return new_weight, new_bias


def convert_official_checkpoint(checkpoint, model, mlm_labels: Optional[Union[str, Path, Dict[str, int]]] = None,
                                *, source: str = "the checkpoint"
                                ) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """An official training checkpoint → (our tunable state dict for ``model``, report).

    checkpoint: what ``torch.load`` returns for an official ``checkpoint-N.pth`` (or its "model" entry).
    model: an ``M2CLIP`` with the matching layout (``k400_b16_8f`` for the official K400 B/16 run).
    mlm_labels: the official label-word file or its {word: row} mapping, to carry the MLM decoder over.
    source: how error messages name the checkpoint (its path).
    Raises ValueError when the checkpoint holds no official adapter or head key at all, or its layout
    does not fit the model (naming what differs), and KeyError for an incomplete group of official
    keys (an MLM head lacking a key included, even when its decoder rows would not be used).
    """
    state = _official_model_state(checkpoint)
    _require_official_keys(checkpoint, state, source)
    report = ConversionReport()
    ours: Dict[str, torch.Tensor] = {}
    text_layers = len(model.clip.transformer.resblocks)
    module_names = {name for name, _ in model.named_modules()}
    unplaced = []
    handled = set()

    for (block, where), prefix in _adapter_prefixes(state, _VISION_ADAPTER).items():
        name = f"{block}_pre_{where}"
        if name not in model.ted_adapters:
            unplaced.append(f"{prefix}* (the model has TED adapters at {sorted(model.ted_adapters) or 'none'})")
            continue
        group = {k: v for k, v in state.items() if k.startswith(prefix)}
        ours.update({f"ted_adapters.{name}.{k}": v for k, v in convert_official_adapter(group, prefix).items()})
        handled.update(group)

    for (block, where), prefix in _adapter_prefixes(state, _TEXT_ADAPTER_KEY).items():
        target = "cmlm_adapter" if int(block) == text_layers else f"text_adapters.{block}"
        if where == "attn":
            unplaced.append(f"{prefix}* (text adapters before attention are not supported: ours sit before the "
                            f"MLP, where the text cache stays valid)")
        elif target not in module_names:
            unplaced.append(f"{prefix}* (the model has text adapters in blocks {sorted(model.text_adapters)}"
                            f"{' and the CMLM block' if model.config.cmlm else ''})")
        else:
            group = _rename_group(state, prefix, _TEXT_ADAPTER, f"{target}.")
            ours.update(group)
            handled.update(f"{prefix}{old}.{p}" for old in _TEXT_ADAPTER for p in ("weight", "bias"))

    if any(k.startswith("visual.t_adapter.") for k in state):
        if model.temporal_adapter is None:
            unplaced.append("visual.t_adapter.* (the model has temporal_adapter=False)")
        else:
            ours.update(_rename_group(state, "visual.t_adapter.", _TEMPORAL_ADAPTER, "temporal_adapter."))
        handled.update(k for k in state if k.startswith("visual.t_adapter."))
    if any(k.startswith("visual.adapter_fc.") for k in state):
        ours.update(_rename_group(state, "visual.", {"adapter_fc": "fc"}, "vc_head."))
        handled.update(k for k in state if k.startswith("visual.adapter_fc."))

    mlm_keys = {k for k in state if k.startswith("mlm_adapter.")}
    if mlm_keys:
        _require_complete_mlm_head(state)
        handled.update(mlm_keys)
        if not model.config.cmlm:
            report.notes.append("MLM head: the model has no CMLM head; the checkpoint's is dropped")
        else:
            ours.update(_rename_group(state, "mlm_adapter.", _MLM_TRANSFORM, "mlm_head."))
            if mlm_labels is None:
                report.notes.append("MLM decoder: no label-word file given (mlm_labels=...), rows cannot be matched "
                                    "to words; it keeps its initialisation (training only: evaluation is unaffected)")
            else:
                words = mlm_labels if isinstance(mlm_labels, Mapping) else read_mlm_labels(mlm_labels)
                ours["mlm_head.decoder.weight"], ours["mlm_head.decoder.bias"] = _mlm_rows(
                    state["mlm_adapter.decoder.weight"], state["mlm_adapter.bias"], model.vocabulary, words,
                    model.mlm_head.decoder.weight.detach(), model.mlm_head.decoder.bias.detach(), report)

    for key in state:
        if key in handled:
            continue
        if "adapter" in key:
            unplaced.append(key)  # trained by the official code, but nothing of ours corresponds
        else:
            report.ignored_frozen += 1
    if unplaced:
        raise ConversionError("the official checkpoint does not fit this model; no place for: " + "; ".join(unplaced))

    expected = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in ours.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ConversionError("shapes differ (is the preset's bottleneck / class list the checkpoint's?): "
                         + "; ".join(wrong[:8]))
    report.converted = len(handled)
    report.kept_initial = sorted(k for k in model.tunable_state_dict() if k not in ours)
    return {k: v.to(expected[k].dtype) for k, v in ours.items()}, report


def load_official_checkpoint(model, checkpoint, mlm_labels=None, *, source: Optional[str] = None,
                             trust: bool = False) -> ConversionReport:
    """Convert (see :func:`convert_official_checkpoint`) and load into ``model``; ``checkpoint`` may be a path
    (an unreadable or unsafe file raises :class:`m2clip_fast.checkpoint.CheckpointError`, a ValueError, naming
    it; ``trust``: see :func:`~m2clip_fast.checkpoint.load_checkpoint_file`). ``source`` names the checkpoint in
    errors (default: its path, or "the checkpoint")."""
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        checkpoint = load_checkpoint_file(checkpoint, "official checkpoint", trust=trust)
    state, report = convert_official_checkpoint(checkpoint, model, mlm_labels, source=source or "the checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # every key was checked against model.state_dict() above
    return report


OFFICIAL_TEMPLATE = OFFICIAL_TEMPLATES[0]  # the official text_prompt()'s only one: no trailing period


PROG = "python -m m2clip_fast.convert"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG,
                                description="Convert an official M²-CLIP checkpoint into an m2clip-fast one.")
    p.add_argument("official", help="the official checkpoint-N.pth")
    p.add_argument("--out", required=True, help="m2clip-fast checkpoint to write")
    p.add_argument("--preset", default="k400_b16_8f", help="our preset with the checkpoint's layout")
    p.add_argument("--pretrained", default="openai", help="CLIP weights: an open_clip tag or a local file; 'none'")
    p.add_argument("--class-names", default=None, help="class list (shipped name or file) if not the preset's")
    p.add_argument("--mlm-labels", default=None, help="the official label-word file (k400_mlm_lables.txt)")
    p.add_argument("--template", default=OFFICIAL_TEMPLATE,
                   help="prompt template the text adapters were trained with (default: the official one)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = p.parse_args(argv)
    return run_main(lambda: _convert(args), PROG)


def _convert(args: argparse.Namespace) -> int:
    from .model import create_model
    from .presets import parse_overrides

    # Both input files first: a wrong file should fail before the (possibly downloaded) CLIP is built.
    checkpoint = load_checkpoint_file(args.official, "official checkpoint", trust=args.trust_checkpoint)
    _require_official_keys(checkpoint, _official_model_state(checkpoint), args.official)
    mlm_labels = read_mlm_labels(args.mlm_labels) if args.mlm_labels is not None else None
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    try:
        model = create_model(args.preset, pretrained=pretrained, class_names=args.class_names,
                             templates=(args.template,), **parse_overrides(args.set))
        report = load_official_checkpoint(model, checkpoint, mlm_labels, source=args.official)
    except KeyError as exc:  # an incomplete group of official keys: the message names the missing key
        raise ConversionError(exc.args[0]) from None
    atomic_save(build_checkpoint(model, pretrained), Path(args.out))
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
