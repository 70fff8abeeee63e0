"""Model configuration as data: the ``M2CLIPConfig`` dataclass, named presets, YAML files and
``key=value`` overrides.

A training run's configuration is ``preset ← YAML file ← --set overrides``, each layer replacing the
keys it names. Model keys live at the top level; the training loop reads its own section (``train``),
which is kept as a plain dict here so this module doesn't depend on the loop.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from .errors import MissingFileError, UsageError, UserError
from .heads import DEFAULT_LOSS_WEIGHTS
from .text import DEFAULT_TEMPLATES, OFFICIAL_TEMPLATES

TINY_BACKBONE = "m2clip-tiny"  # 32 px frames, 4 px patches: the unit tests' backbone
DEMO_BACKBONE = "m2clip-demo"  # the same at 64 px with 8 px patches (same token count), for the synthetic demo
# open_clip configs shipped in m2clip_fast/assets (random init: nothing to download)
SHIPPED_BACKBONES = (TINY_BACKBONE, DEMO_BACKBONE)


class ConfigError(UserError, KeyError):
    """An unknown preset or config key. A KeyError, as a dict lookup of an unknown key raises, for library
    callers that treat a config as a mapping; a UserError, so the commands print it as one line."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class M2CLIPConfig:
    """Everything ``create_model`` needs to build an M2CLIP.

    backbone: an open_clip model name (``ViT-B-16``), or ``m2clip-tiny`` / ``m2clip-demo`` (shipped: tests, demo).
    ted_layers: TED adapters go into the last ``ted_layers`` vision blocks, before attention and/or the MLP.
    text_adapter_layers: text adapters (pre-MLP) in the last ``text_adapter_layers`` text blocks;
        the CMLM cross-attention block gets its own when ``cmlm`` is on.
    """

    backbone: str = "ViT-B-16"
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU
    num_frames: int = 8
    class_names: Optional[Union[str, Tuple[str, ...]]] = "kinetics400"
    templates: Tuple[str, ...] = DEFAULT_TEMPLATES
    # vision TED adapters
    ted_adapters: bool = True
    ted_bottleneck: int = 384
    ted_layers: int = 12
    ted_pre_attn: bool = False
    ted_pre_mlp: bool = True
    ted_enhance: bool = True
    ted_difference: bool = True
    fused: bool = True
    attention: str = "sdpa"  # "sdpa" | "xformers" (CUDA) | "math" | "torch" (nn.MultiheadAttention as is)
    # per-frame temporal adapter on projected class embeddings (official ``t_adapter``)
    temporal_adapter: bool = True
    # text adapters
    text_adapter_layers: int = 1
    text_bottleneck: int = 384
    # heads: a weight of 0 turns a head off
    loss_weights: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    vc_dropout: float = 0.5
    mask_ratio: float = 0.2
    train: Dict[str, Any] = field(default_factory=dict)

    @property
    def cmlm(self) -> bool:
        return self.loss_weights.get("cmlm", 0.0) > 0


# Training keys and their defaults. The defaults of keys added later reproduce what runs did before them
# (checkpoint.LEGACY_TRAIN_SETTINGS lists those values for checkpoints that predate a key).
_TRAIN_DEFAULTS: Dict[str, Any] = {
    "epochs": 30, "batch_size": 32, "blr": 1e-3, "weight_decay": 0.01, "warmup_epochs": 2,
    "text_lr_scale": 0.5, "grad_clip": None, "accum_steps": 1, "sampling": "dense", "stride": 8,
    "flip": True, "workers": 4, "amp": "auto", "eval_every": 1, "views": "1x1", "max_bad_fraction": 0.5,
    "log_every": 10,  # optimizer steps between copies of the losses to the host (each one waits for the device)
    # global_batch: clips per optimizer step over all processes; accum_steps is then derived from it
    # (global_batch / (batch_size x processes)). no_decay: which parameters get no weight decay: "1d" every
    # 1-D tensor (biases and norm weights), "bias" those whose name contains ".bias" (the official rule).
    "global_batch": None, "no_decay": "1d", "resize": "short_side_jitter", "scale_range": (1.0, 1.15),
    "rand_augment": None,
}

# What the official training uses where its scripts and main.py say so (github.com/sallymmx/m2clip:
# scripts/train_k400_clip_vit_b16_adapter12x384.sh, scripts/train_ssv2_clip_vit_b16.sh, main.py's argparse
# defaults and optimizer, utils.text_prompt). The paper gives no schedule, batch or augmentation.
_OFFICIAL_TRAIN: Dict[str, Any] = {
    "blr": 1e-3,  # main.py default --blr 1e-3, "per 256 samples": lr = blr x global batch / 256
    "weight_decay": 1e-2,  # main.py default --weight_decay 1e-2 (AdamW)
    "warmup_epochs": 2,  # both scripts: --warmup_epochs 2 (per-step linear warmup, then cosine: main.py lr_func)
    "text_lr_scale": 0.5,  # main.py: the text adapters' ("textad_") parameter groups at args.lr / 2
    "no_decay": "bias",  # main.py: weight decay 0 for the parameters whose name contains ".bias"
    "grad_clip": None,  # main.py clips no gradients
    "accum_steps": 1,  # (derived from global_batch)
}

PRESETS: Dict[str, Dict[str, Any]] = {
    # Kinetics-400, ViT-B/16, 8 frames: 12 pre-MLP TED adapters and text adapters before the MLP of the last
    # text block and of the CMLM cross block (the official clip_vit_base_patch16_multimodal_adapter12x384).
    "k400_b16_8f": {
        "class_names": "kinetics400", "templates": OFFICIAL_TEMPLATES,
        "num_frames": 8,  # train_k400 script --num_frames 8
        "ted_layers": 12, "ted_bottleneck": 384,  # train_k400 script --model ..._adapter12x384 (pre-MLP only)
        "train": {
            **_TRAIN_DEFAULTS, **_OFFICIAL_TRAIN,
            "epochs": 12,  # train_k400 script --epochs 12
            "batch_size": 36,  # train_k400 script --batch_size 36 (per GPU)
            "global_batch": 72,  # train_k400 script: 36 per GPU x --nproc_per_node 2
            # train_k400 script --sampling_rate 16: 8 frames 16 apart (the paper says "sparse frame sampling")
            "sampling": "dense", "stride": 16,
            # train_k400 script --resize_type random_short_side_scale_jitter --scale_range 1.0 1.15
            "resize": "short_side_jitter", "scale_range": (1.0, 1.15),
            "flip": True,  # train_k400 script --mirror
            "rand_augment": None,  # train_k400 script: no --auto_augment
            # train_k400 script --num_spatial_views 4 --num_temporal_views 3: 3 clips x 4 crops (paper Table 1:
            # 8x4x3, frames x crops x clips)
            "views": "3x4",
        },
    },
    # Something-Something-V2: 24 TED adapters (before attention and before the MLP: the official
    # clip_vit_base_patch16_multimodal_adapter24x384, whose text adapters differ: see the README).
    "ssv2_b16_8f": {
        "class_names": "ssv2", "ted_pre_attn": True, "templates": OFFICIAL_TEMPLATES,
        "num_frames": 8,  # train_ssv2 script --num_frames 8
        "ted_layers": 12, "ted_bottleneck": 384,  # train_ssv2 script --model ..._adapter24x384 (2 per block)
        "train": {
            **_TRAIN_DEFAULTS, **_OFFICIAL_TRAIN,
            "epochs": 50,  # train_ssv2 script --epochs 50
            "batch_size": 32,  # train_ssv2 script --batch_size 32 (per GPU)
            "global_batch": 128,  # train_ssv2 script: 32 per GPU x --nproc_per_node 4
            "sampling": "uniform",  # train_ssv2 script --sampling_rate 0: one frame per segment (TSN)
            # the script sets neither: main.py defaults --resize_type random_resized_crop --scale_range 0.08 1.0
            "resize": "random_resized_crop", "scale_range": (0.08, 1.0),
            "flip": False,  # train_ssv2 script: no --mirror (main.py default off); left/right is the label
            "rand_augment": "rand-m7-n4-mstd0.5-inc1",  # train_ssv2 script --auto_augment
            # train_ssv2 script --num_spatial_views 3 --num_temporal_views 1: 1 clip x 3 crops (the paper's
            # Table 2 lists 8x1x3, which by Table 1's frames x crops x clips would be 1 crop x 3 clips)
            "views": "1x3",
        },
    },
    # The synthetic motion demo: a tiny frozen backbone, trained on 2 CPU cores in minutes.
    "demo": {
        # Adapters before attention and before the MLP (as for SSv2, the motion-heavy dataset): direction
        # of motion needs the frozen blocks' nonlinearity between adapter updates. A bottleneck twice the
        # width is what tells a rotation or a growth from its reverse; the 64 px backbone sees the videos at
        # full size, where a growing bar changes by about half a pixel per sampled frame. (The runs behind
        # these choices: docs/demo_tuning.md.)
        "backbone": DEMO_BACKBONE, "quick_gelu": True, "class_names": None, "ted_bottleneck": 256,
        "ted_layers": 3, "ted_pre_attn": True, "text_bottleneck": 32, "templates": ("a video of a shape {}.",),
        # Every 4th frame of the 32-frame videos: the clip spans the whole growth or turn, so the change between
        # sampled frames is large.
        "train": {**_TRAIN_DEFAULTS, "epochs": 24, "batch_size": 16, "blr": 0.08, "warmup_epochs": 1,
                  "grad_clip": 1.0, "stride": 4, "workers": 2, "amp": "none", "flip": False, "eval_every": 4},
    },
    # A tiny model with 400 classes for unit tests.
    "tiny": {"backbone": TINY_BACKBONE, "ted_bottleneck": 16, "ted_layers": 2, "text_bottleneck": 16,
             "num_frames": 4, "class_names": "kinetics400"},
}


def _field_names() -> set:
    return {f.name for f in dataclasses.fields(M2CLIPConfig)}


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in _field_names():
            raise ConfigError(f"unknown config key {key!r} in {where}; known keys: {sorted(_field_names())}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """['train.epochs=3', 'ted_bottleneck=64'] → nested dict; values parsed as Python literals when they can be."""
    result: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = _literal(raw)
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} was set to {node!r} by another override, not to "
                                  f"a mapping of keys")
        node[leaf] = value
    return result


_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _literal(raw: str) -> Any:
    """An override's value: a Python literal when it is one (``nan``/``inf`` as the floats they name, so that
    the range checks refuse them), else the string itself."""
    if raw.strip().lower() in _NON_FINITE:
        return float(raw)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def resolve_config(
    preset: Optional[str] = None,
    config_file: Optional[Union[str, Path]] = None,
    overrides: Optional[Dict[str, Any]] = None,
) -> M2CLIPConfig:
    """preset ← YAML file ← overrides, as an ``M2CLIPConfig`` (unknown keys are an error)."""
    loaded: Dict[str, Any] = {}
    if config_file is not None:
        import yaml

        if not Path(config_file).is_file():
            raise MissingFileError(f"config file {config_file} not found")
        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError(f"{config_file} is not a readable YAML file: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{config_file}: expected a mapping of config keys, got {type(loaded).__name__}")
        file_preset = loaded.pop("preset", None)
        if preset is None:
            preset = file_preset  # a YAML file may name the preset it refines
    values: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        values = _merge(values, PRESETS[preset], f"preset {preset}")
    if loaded:
        values = _merge(values, loaded, str(config_file))
    if overrides:
        values = _merge(values, overrides, "overrides")
    train_section = values.pop("train", {})
    if not isinstance(train_section, dict):
        raise ConfigError(f"'train' must be a mapping of training keys, got {train_section!r}")
    unknown = sorted(set(train_section) - set(_TRAIN_DEFAULTS))
    if unknown:  # a typo such as train.lr (the key is blr) would otherwise be stored and ignored
        raise ConfigError(f"unknown training key(s) {', '.join('train.' + k for k in unknown)}; known keys: "
                          f"{sorted(_TRAIN_DEFAULTS)}")
    train = {**_TRAIN_DEFAULTS, **train_section}
    for key in ("templates",):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])
    if isinstance(train.get("scale_range"), list):  # as YAML and --set give it
        train["scale_range"] = tuple(train["scale_range"])
    config = M2CLIPConfig(**values, train=train)
    validate_config(config)
    return config


# ------------------------------------------------------------------------------------------ validation
# Each key's type and range, checked once when the config is resolved: a wrong value is then a one-line error
# naming the key before anything runs, not a TypeError after an epoch (train.eval_every=0) or a silent NaN run.

def _count(minimum: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer"
        return None if value >= minimum else f"an integer >= {minimum}"
    return check


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
            optional: bool = False):
    """A finite real in [low, high] (open ends where asked); None too when ``optional``."""
    def check(value):
        if value is None and optional:
            return None
        bounds = (f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else
                  f" and {'<' if high_open else '<='} {high:g}"))
        want = f"a finite number {bounds}" + (" (or None)" if optional else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return want
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        return want if too_low or too_high else None
    return check


def _optional(check):
    def optional(value):
        want = None if value is None else check(value)
        return want and f"None or {want}"
    return optional


def _boolean(value):
    return None if isinstance(value, bool) else "true or false"


def _one_of(*choices):
    def check(value):
        return None if value in choices else f"one of {', '.join(map(str, choices))}"
    return check


def _text(value):
    return None if isinstance(value, str) and value else "a non-empty string"


def _class_names(value):
    if value is None or (isinstance(value, str) and value):
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return None
    return "a class-list name, a file, or a list of names"


def _templates(value):
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and "{}" in v for v in value):
        return None
    return "a list of prompt templates, each holding {} for the class name"


def _loss_weights(value):
    if not isinstance(value, dict) or set(value) - set(DEFAULT_LOSS_WEIGHTS):
        return f"a mapping of {', '.join(DEFAULT_LOSS_WEIGHTS)} to weights"
    bad = [k for k, w in value.items() if _number(0)(w)]
    return f"weights that are finite numbers >= 0 ({', '.join(bad)} not)" if bad else None


def _views(value):
    from .data.loader import parse_views  # the one parser of CLIPSxCROPS (lazy: data imports torch)

    try:
        parse_views(value) if isinstance(value, str) else parse_views("")
    except UsageError:
        return "CLIPSxCROPS with >= 1 clip and 1, 3 or 4 crops, e.g. 4x3"
    return None


MODEL_CHECKS = {
    "backbone": _text, "quick_gelu": _boolean, "num_frames": _count(1), "class_names": _class_names,
    "templates": _templates, "ted_adapters": _boolean, "ted_bottleneck": _count(1), "ted_layers": _count(0),
    "ted_pre_attn": _boolean, "ted_pre_mlp": _boolean, "ted_enhance": _boolean, "ted_difference": _boolean,
    "fused": _boolean, "attention": _one_of("sdpa", "xformers", "math", "torch"), "temporal_adapter": _boolean,
    "text_adapter_layers": _count(0), "text_bottleneck": _count(1), "loss_weights": _loss_weights,
    "vc_dropout": _number(0, 1, high_open=True), "mask_ratio": _number(0, 1),
}
def _rand_augment(value):
    if value is None:
        return None
    from .data.randaugment import check_rand_augment  # lazy: data imports torch

    try:
        check_rand_augment(value)
    except UsageError as exc:
        return f"None or a timm RandAugment string such as rand-m7-n4-mstd0.5-inc1 ({exc})"
    return None


def _train_combinations(train: Dict[str, Any]) -> Iterable[Tuple[str, Any, str]]:
    """Problems of train keys that depend on each other: ``(key, value, what was expected)``."""
    from .data.transforms import RESIZE_MODES, check_scale_range  # lazy: data imports torch

    if train.get("resize") in RESIZE_MODES and "scale_range" in train:
        problem = check_scale_range(train["resize"], train["scale_range"])
        if problem:
            yield "train.scale_range", train["scale_range"], problem
    if train.get("global_batch") is not None and train.get("accum_steps", 1) != 1:
        yield ("train.accum_steps", train["accum_steps"],
               "1 when train.global_batch is set (the accumulation is derived from it)")


TRAIN_CHECKS = {
    "epochs": _count(1), "batch_size": _count(1), "blr": _number(0, low_open=True), "weight_decay": _number(0),
    "warmup_epochs": _number(0), "text_lr_scale": _number(0), "grad_clip": _number(0, low_open=True, optional=True),
    "accum_steps": _count(1), "sampling": _one_of("dense", "uniform"), "stride": _count(1), "flip": _boolean,
    "workers": _count(0), "amp": _one_of("auto", "none", "fp32", "bf16", "fp16"), "eval_every": _count(1),
    "views": _views, "max_bad_fraction": _number(0, 1, low_open=True), "log_every": _count(1),
    "global_batch": _optional(_count(1)),
    "no_decay": _one_of("1d", "bias"), "resize": _one_of("short_side_jitter", "random_resized_crop"),
    "rand_augment": _rand_augment,
}


def validate_config(config: M2CLIPConfig) -> None:
    """Raise a ConfigError naming every key whose value has the wrong type or is out of range."""
    problems = [(key, getattr(config, key), check(getattr(config, key))) for key, check in MODEL_CHECKS.items()]
    problems += [(f"train.{key}", config.train[key], check(config.train[key])) for key, check in TRAIN_CHECKS.items()
                 if key in config.train]  # a model built outside training has no train section
    problems += list(_train_combinations(config.train))
    bad = [f"{key}={value!r} (expected {want})" for key, value, want in problems if want]
    if bad:
        raise ConfigError(f"invalid config value{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}")
