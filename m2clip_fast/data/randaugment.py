"""RandAugment for clips: timm's ``rand_augment_transform``, the same operations and magnitudes on every frame.

A RandAugment config string (``rand-m7-n4-mstd0.5-inc1``: magnitude 7, 4 operations, magnitude noise with
std 0.5, the "increasing" op set) is checked here, so that a typo is a one-line error when the config is
resolved, and then handed to timm, which parses it and builds the operations (timm's ``inc1`` op set and
``mstd`` Gaussian magnitude noise are the semantics of the SlowFast copy the official code uses;
torchvision's RandAugment has neither).

timm draws everything a RandAugment call decides (which ops, whether each applies, its magnitude, its sign,
its interpolation) from Python's ``random`` and numpy's global RNG, and none of those draws depends on the
image. So a clip gets one set of decisions for all its frames by putting both RNGs into the same seeded
state before each frame: every frame then equals timm's own single-image result for that state. The seed
comes from the item's seeded generator (see :mod:`.loader`), so a resumed run draws the same; both global
RNG states are restored afterwards, leaving the caller's streams as they were.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError

__all__ = ["check_rand_augment", "clip_rand_augment"]

_FLOAT = r"\d+(?:\.\d*)?"
# the numeric sections timm's rand_augment_transform reads, each with the values it accepts
_SECTIONS = {"m": r"\d+", "n": r"\d+", "mstd": _FLOAT, "mmax": r"\d+", "inc": r"[01]", "p": _FLOAT}
_OP_SETS = ("weights", "3a", "3aw")  # timm's named op sets ('t' section)


def check_rand_augment(config: str) -> None:
    """Raise a UsageError naming the bad part unless ``config`` is a RandAugment string timm reads fully:
    ``rand`` then ``-``-separated sections ``mN``, ``nN``, ``mstdF``, ``mmaxN``, ``inc0|1``, ``pF``, ``tNAME``.
    (timm itself skips sections without digits and asserts on unknown ones.)"""
    if not isinstance(config, str) or not config.startswith("rand"):
        raise UsageError(f"RandAugment config {config!r}: expected 'rand-...', e.g. rand-m7-n4-mstd0.5-inc1")
    head, *sections = config.split("-")
    if head != "rand":
        raise UsageError(f"RandAugment config {config!r}: the first section must be 'rand', not {head!r}")
    seen = set()
    for section in sections:
        key = _section_key(config, section)
        if key in seen:
            raise UsageError(f"RandAugment config {config!r}: section {key!r} given twice")
        seen.add(key)


def _section_key(config: str, section: str) -> str:
    if section.startswith("t"):
        if section[1:] not in _OP_SETS:
            raise UsageError(f"RandAugment config {config!r}: unknown op set {section!r} (t{'/t'.join(_OP_SETS)})")
        return "t"
    for key in sorted(_SECTIONS, key=len, reverse=True):  # 'mstd'/'mmax' before 'm'
        if section.startswith(key):
            if not re.fullmatch(_SECTIONS[key], section[len(key):]):
                raise UsageError(f"RandAugment config {config!r}: bad value in section {section!r}")
            return key
    raise UsageError(f"RandAugment config {config!r}: unknown section {section!r} (known: "
                     f"{', '.join(list(_SECTIONS) + ['t'])})")


@lru_cache(maxsize=32)
def _transform(config: str, frame_hw: Tuple[int, int]):
    """timm's RandAugment for frames of ``frame_hw``, with the official hparams: bicubic resampling and
    ``translate_const`` 45% of the short side (the official ``create_random_augment``)."""
    from timm.data.auto_augment import rand_augment_transform

    check_rand_augment(config)
    hparams = {"translate_const": int(min(frame_hw) * 0.45), "interpolation": Image.BICUBIC}
    return rand_augment_transform(config, hparams)


def clip_rand_augment(clip: torch.Tensor, config: str, seed: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, H, W, 3): RandAugment ``config`` with one set of decisions, drawn from
    ``seed`` (0 <= seed < 2**32), applied to every frame."""
    if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a uint8 clip of shape (T, H, W, 3), got {clip.dtype} {tuple(clip.shape)}")
    transform = _transform(config, (int(clip.shape[1]), int(clip.shape[2])))
    frames = np.ascontiguousarray(clip.numpy())
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        out = []
        for frame in frames:
            random.seed(seed)
            np.random.seed(seed)
            out.append(np.asarray(transform(Image.fromarray(frame))))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return torch.from_numpy(np.stack(out))
