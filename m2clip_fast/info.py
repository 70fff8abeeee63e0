"""``python -m m2clip_fast.info --preset NAME``: parameters by module and forward GFLOPs per view.

For ``k400_b16_8f`` it also checks the tunable-parameter count against the official release's module set
(16,138,136 with its 520-word MLM vocabulary) and explains any difference.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .cli import run_main
from .errors import UsageError
from .model import M2CLIP, create_model
from .presets import PRESETS, parse_overrides, resolve_config

PROG = "python -m m2clip_fast.info"

# The official K400 ViT-B/16 release's tunable parameters, by module; its MLM decoder adds 513 per word.
OFFICIAL_K400 = {
    "TED E branches": 7_110_144, "TED D branches": 7_137_792, "temporal adapter": 263_936,
    "VC head": 307_600, "text adapters": 788_224, "MLM head (without decoder)": 263_680,
}
OFFICIAL_VOCAB = 520
# Words of the official 520-word list that are in no K400 class name (prompt words it never masks).
OFFICIAL_NON_LABEL_WORDS = ("name", "of", "video")
OFFICIAL_TOTAL = 16_138_136


def tunable_by_module(model: M2CLIP) -> Dict[str, int]:
    """Tunable parameters grouped the way the official release is counted."""
    groups: Dict[str, int] = collections.OrderedDict((k, 0) for k in OFFICIAL_K400)
    groups["MLM decoder"] = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("ted_adapters."):
            branch = name.split(".")[2]
            key = "TED E branches" if branch.endswith("_e") else "TED D branches"
        elif name.startswith("temporal_adapter."):
            key = "temporal adapter"
        elif name.startswith("vc_head."):
            key = "VC head"
        elif name.startswith(("text_adapters.", "cmlm_adapter.")):
            key = "text adapters"
        elif name.startswith("mlm_head.decoder."):
            key = "MLM decoder"
        elif name.startswith("mlm_head."):
            key = "MLM head (without decoder)"
        else:
            key = name.split(".")[0]
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def forward_flops(model: M2CLIP) -> int:
    """FLOPs of one view (1 clip of num_frames frames) through predict(): vision, the adapted text layers
    over the class prompts (the frozen ones are cached), and the heads."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.crop_size
    video = torch.zeros(1, model.num_frames, 3, size, size)
    model.eval()
    model.encode_text()  # fill the text cache, as evaluation does once per class list
    with FlopCounterMode(display=False) as counter:
        model.predict(video)
    return counter.get_total_flops()


def vocabulary_note(model: M2CLIP) -> List[str]:
    words = [w for w in model.vocabulary if not w.startswith("[")]
    special = [w for w in model.vocabulary if w.startswith("[")]
    return [f"MLM vocabulary V = {len(model.vocabulary)} ({len(words)} label words + special {special})"]


def report(model: M2CLIP, groups: Dict[str, int]) -> List[Tuple[str, str]]:
    """Rows (label, count) for the tunable groups, then tunable / total / frozen."""
    rows = []
    total = sum(p.numel() for p in model.parameters())
    tunable = sum(groups.values())
    for key, value in groups.items():
        rows.append((f"  {key}", f"{value:,}"))
    rows.append(("tunable parameters", f"{tunable:,}"))
    rows.append(("total parameters", f"{total:,}"))
    rows.append(("frozen parameters", f"{total - tunable:,}"))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="k400_b16_8f", choices=sorted(PRESETS))
    parser.add_argument("--class-names", default=None, help="class-name file (required for the demo preset)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    args = parser.parse_args(argv)
    return run_main(lambda: _info(args), PROG)


def build_model(preset: str, class_names: Optional[str], overrides: Sequence[str]) -> M2CLIP:
    """The preset's model with random weights; ValueError in command-line terms (--class-names, --set)."""
    config = resolve_config(preset, overrides=parse_overrides(overrides))  # a ConfigError names bad keys
    if class_names is None and config.class_names is None:
        raise UsageError(f"preset {preset} has no class list: pass --class-names FILE (one class name per line)")
    return create_model(config, pretrained=None, class_names=class_names)


def _info(args: argparse.Namespace) -> int:
    model = build_model(args.preset, args.class_names, args.set)
    print(f"preset {args.preset}: backbone {model.config.backbone}, {model.num_frames} frames "
          f"of {model.image_size}px, {model.num_classes} classes, {len(model.ted_adapters)} TED adapters")
    groups = tunable_by_module(model)
    for name, value in report(model, groups):
        print(f"{name:<32}{value:>16}")
    for line in vocabulary_note(model):
        print(line)
    if args.preset == "k400_b16_8f":
        structural = {k: groups.get(k, 0) for k in OFFICIAL_K400}
        mismatched = {k: (v, OFFICIAL_K400[k]) for k, v in structural.items() if v != OFFICIAL_K400[k]}
        expected = sum(OFFICIAL_K400.values()) + 513 * len(model.vocabulary)
        tunable = sum(groups.values())
        print(f"official module set with V = {len(model.vocabulary)}: {expected:,} "
              f"({'matches' if expected == tunable and not mismatched else 'DIFFERS: ' + str(mismatched)})")
        diff = tunable - OFFICIAL_TOTAL
        if diff:
            special = [w for w in model.vocabulary if w.startswith("[")]
            print(f"difference from the official {OFFICIAL_TOTAL:,}: {diff:+,} = 513 x "
                  f"({len(model.vocabulary)} - {OFFICIAL_VOCAB}) MLM-decoder rows, because the official list also "
                  f"holds the non-label words {list(OFFICIAL_NON_LABEL_WORDS)} (never masked) and ours adds the "
                  f"special words {special}")
    if not args.no_flops:
        print(f"forward GFLOPs per view ({model.num_frames} frames, predict): {forward_flops(model) / 1e9:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
