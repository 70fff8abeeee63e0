"""Clip transforms: uint8 frames (T, H, W, 3) -> CLIP-normalised float32 (T, 3, size, size).

Resizing runs on uint8 tensors in channels-last layout (torch's fast antialiased bilinear path on the
CPU; on other devices, whose antialiased resize takes floating-point input only, in float32 rounded back
to uint8) and only the cropped pixels are converted to float and normalised. The transforms run on the
clip's device (CPU frames from PyAV, CUDA frames from DALI's GPU decoder): the normalisation constants
follow it. All frames of a clip share one RandAugment draw, resize, crop and flip, so motion is preserved.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .randaugment import clip_rand_augment

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "resize_short_side",
    "resize_via_float",
    "normalize",
    "CROP_FRACTIONS",
    "crop_offsets",
    "RESIZE_MODES",
    "check_scale_range",
    "random_resized_crop",
    "train_transform",
    "test_transform",
    "views_from_clips",
]

CLIP_MEAN = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32)
CLIP_STD = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32)
# (x / 255 - mean) / std folded into one multiply-add per pixel; kept as float32 values, from which each
# call makes its tensors on the clip's device (and in the clip's tensor mode, e.g. FakeTensorMode)
_SCALE = (1.0 / (255.0 * CLIP_STD)).tolist()
_SHIFT = (-CLIP_MEAN / CLIP_STD).tolist()


def _as_tchw(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, H, W) view (channels-last memory, no copy)."""
    if not isinstance(clip, torch.Tensor):
        clip = torch.as_tensor(np.asarray(clip))
    if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a uint8 clip of shape (T, H, W, 3), got {clip.dtype} {tuple(clip.shape)}")
    if clip.shape[0] == 0 or clip.shape[1] == 0 or clip.shape[2] == 0:
        raise ValueError(f"empty clip {tuple(clip.shape)}")
    return clip.permute(0, 3, 1, 2)


def resize_short_side(clip: torch.Tensor, short: int) -> torch.Tensor:
    """Resize uint8 (T, H, W, 3) so that min(H, W) == ``short``: uint8 (T, 3, H', W').

    The long side becomes ``long * short // short_side`` (floor, as the official evaluation
    does). Bilinear with antialiasing, so downscaling does not alias.
    """
    return _resize_short(_as_tchw(clip), short)


def _resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, H', W') with min(H', W') == ``short`` (see :func:`resize_short_side`)."""
    if short < 1:
        raise ValueError(f"short side must be >= 1, got {short}")
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = short, max(short, w * short // h)
    else:
        new_h, new_w = max(short, h * short // w), short
    return _resize(x, new_h, new_w)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, h, w), bilinear with antialiasing (the input itself if the size is h, w)."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu":
        return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return resize_via_float(x, (h, w))


def resize_via_float(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, *size): the antialiased bilinear resize computed in float32 and
    rounded to the nearest level (what the CPU's uint8 path computes, up to its fixed-point rounding)."""
    out = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (..., 3, H, W) on ``clip``'s device, ``(x / 255 - CLIP_MEAN) / CLIP_STD``."""
    shift, scale = (torch.tensor(v, dtype=torch.float32, device=clip.device).view(3, 1, 1) for v in (_SHIFT, _SCALE))
    return torch.addcmul(shift, clip.float(), scale).contiguous()


# Test-crop positions along the long side as fractions of its slack (long − size), the official M²-CLIP
# offsets; crop_offsets rounds them down to whole pixels, the DALI loader hands them to DALI as they are.
# (Quarters and halves: exact in binary floating point, so the rounding is that of the official m // 4.)
CROP_FRACTIONS = {1: (0.5,), 3: (0.0, 0.5, 1.0), 4: (0.0, 0.25, 0.5, 1.0)}


def crop_offsets(long: int, size: int, num_crops: int) -> List[int]:
    """Start offsets of the test crops along the long side (length ``long``).

    With ``m = long - size``: 1 crop -> ``[m // 2]``; 3 crops -> ``[0, m // 2, m]``; 4 crops ->
    ``[0, m // 4, m // 2, m]`` (:data:`CROP_FRACTIONS` of ``m``).
    """
    m = long - size
    if m < 0:
        raise ValueError(f"crop size {size} is larger than the side {long}")
    if num_crops not in CROP_FRACTIONS:
        raise ValueError(f"num_crops must be 1, 3 or 4, got {num_crops}")
    return [int(m * f) for f in CROP_FRACTIONS[num_crops]]


# Training resize modes, named after the official --resize_type values:
# short_side_jitter: the short side resized to size x [scale_range], then a random size x size crop;
# random_resized_crop: an Inception-style crop of scale_range of the frame's area (aspect 3/4 to 4/3), resized.
RESIZE_MODES = ("short_side_jitter", "random_resized_crop")
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


def check_scale_range(resize: str, scale_range: Sequence[float]) -> Optional[str]:
    """None if ``scale_range`` suits ``resize``, else what it should be: jitter scales are multiples of the
    crop size (1 <= lo <= hi), random-resized-crop scales fractions of the frame's area (0 < lo <= hi <= 1)."""
    if resize not in RESIZE_MODES:
        return f"a resize of {', '.join(RESIZE_MODES)}, not {resize!r}"
    ok = (isinstance(scale_range, (list, tuple)) and len(scale_range) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in scale_range))
    lo, hi = scale_range if ok else (0, 0)
    if resize == "short_side_jitter" and not (ok and 1 <= lo <= hi):
        return f"two numbers 1 <= lo <= hi for {resize} (multiples of the crop size)"
    if resize == "random_resized_crop" and not (ok and 0 < lo <= hi <= 1):
        return f"two numbers 0 < lo <= hi <= 1 for {resize} (fractions of the frame's area)"
    return None


def _short_side_jitter(x: torch.Tensor, size: int, rng: np.random.Generator,
                       scale_range: Tuple[float, float]) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, size, size): short side to an integer drawn uniformly from
    ``[round(size * lo), round(size * hi)]``, then one random crop."""
    lo, hi = round(size * scale_range[0]), round(size * scale_range[1])
    if not 1 <= size <= lo <= hi:
        raise ValueError(f"need 1 <= size <= size*scale_range[0] <= size*scale_range[1], got "
                         f"size={size}, scale_range={scale_range}")
    x = _resize_short(x, int(rng.integers(lo, hi + 1)))
    h, w = x.shape[-2:]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return x[..., top:top + size, left:left + size]


def random_resized_crop(x: torch.Tensor, size: int, rng: np.random.Generator,
                        scale_range: Tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, size, size): one Inception-style crop for the whole clip.

    As the official (SlowFast) ``random_resized_crop``: up to 10 tries of an area of ``scale_range`` of the
    frame's and a log-uniform aspect ratio in [3/4, 4/3], the first that fits taken at a uniformly random
    position; if none fits, the centre crop of the frame clamped to that aspect range. Then resized.
    """
    h, w = x.shape[-2:]
    log_ratio = (np.log(RRC_RATIO[0]), np.log(RRC_RATIO[1]))
    for _ in range(RRC_ATTEMPTS):
        area = rng.uniform(*scale_range) * h * w
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ratio = w / h
        cw, ch = w, h
        if ratio < RRC_RATIO[0]:
            ch = int(round(w / RRC_RATIO[0]))
        elif ratio > RRC_RATIO[1]:
            cw = int(round(h * RRC_RATIO[1]))
        top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(x[..., top:top + ch, left:left + cw], size, size)


def train_transform(
    clip: torch.Tensor,
    *,
    size: int,
    rng: np.random.Generator,
    scale_range: Tuple[float, float] = (1.0, 1.15),
    flip: bool = True,
    resize: str = "short_side_jitter",
    rand_augment: Optional[str] = None,
) -> torch.Tensor:
    """Training augmentation: uint8 (T, H, W, 3) -> float32 (T, 3, size, size), every random choice drawn from
    ``rng`` and shared by all T frames.

    In the official order: RandAugment (``rand_augment``, e.g. ``"rand-m7-n4-mstd0.5-inc1"``) on the decoded
    frames; then ``resize``: ``"short_side_jitter"`` (the short side resized to an integer drawn uniformly
    from ``[round(size * scale_range[0]), round(size * scale_range[1])]``, then a random ``size`` x ``size``
    crop) or ``"random_resized_crop"`` (:func:`random_resized_crop`, ``scale_range`` of the area); then, if
    ``flip``, a horizontal flip with probability 1/2. Disable ``flip`` where left/right is the label
    (Something-Something).
    """
    x = _as_tchw(clip)
    if rand_augment:
        x = _as_tchw(clip_rand_augment(x.permute(0, 2, 3, 1), rand_augment, int(rng.integers(0, 2 ** 32))))
    if resize == "short_side_jitter":
        x = _short_side_jitter(x, size, rng, scale_range)
    elif resize == "random_resized_crop":
        x = random_resized_crop(x, size, rng, scale_range)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x)


def test_transform(clip: torch.Tensor, *, size: int, num_crops: int = 1) -> torch.Tensor:
    """Evaluation views: uint8 (T, H, W, 3) -> float32 (num_crops, T, 3, size, size).

    Resize the short side to ``size``, then take ``num_crops`` (1, 3 or 4) crops along the long
    side at :func:`crop_offsets` (1 crop: the centre).
    """
    x = resize_short_side(clip, size)
    h, w = x.shape[-2:]
    crops = []
    for offset in crop_offsets(max(h, w), size, num_crops):
        if w >= h:
            top = (h - size) // 2
            crops.append(x[..., top:top + size, offset:offset + size])
        else:
            left = (w - size) // 2
            crops.append(x[..., offset:offset + size, left:left + size])
    return normalize(torch.stack(crops))


def views_from_clips(clips: Sequence[torch.Tensor], *, size: int, num_crops: int) -> torch.Tensor:
    """Test views of several temporal clips: float32 (len(clips) * num_crops, T, 3, size, size).

    Views are ordered clip-major: all crops of clip 0, then of clip 1, ...
    """
    return torch.cat([test_transform(c, size=size, num_crops=num_crops) for c in clips])
