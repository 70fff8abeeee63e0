"""Frame-index samplers (numpy only).

Every sampler returns int64 indices of shape (num_clips, num_frames), all within
[0, video_frames). Training samplers draw from the ``numpy.random.Generator`` they are given, so a
seeded generator gives the same indices every time; test samplers are deterministic.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UsageError

__all__ = ["dense_indices", "uniform_indices", "sample_indices", "SAMPLINGS", "check_clip_settings"]

SAMPLINGS = ("dense", "uniform")


def check_clip_settings(sampling: str, num_frames: int, stride: int) -> None:
    """A loader's sampling settings, checked when it is built (a zero would otherwise fail every sample alike)."""
    if sampling not in SAMPLINGS:
        raise UsageError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    for name, value in (("num_frames", num_frames), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


def _check(video_frames: int, num_frames: int, num_clips: int, train: bool, rng) -> None:
    if video_frames <= 0:
        raise ValueError(f"cannot sample frames from a video with {video_frames} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if train and num_clips != 1:
        raise ValueError(f"training samples one clip per video, got num_clips={num_clips}")
    if train and not isinstance(rng, np.random.Generator):
        raise TypeError("training sampling needs a numpy.random.Generator as rng")


def _fit(indices: np.ndarray, video_frames: int, short: str) -> np.ndarray:
    """Map indices past the end of a short video back into it."""
    if short == "clamp":  # repeat the last frame, as the official loader does
        return np.minimum(indices, video_frames - 1)
    if short == "loop":
        return indices % video_frames
    raise ValueError(f"short must be 'clamp' or 'loop', got {short!r}")


def dense_indices(
    video_frames: int,
    num_frames: int,
    stride: int,
    *,
    train: bool,
    num_clips: int = 1,
    rng: Optional[np.random.Generator] = None,
    short: str = "clamp",
) -> np.ndarray:
    """``num_frames`` frames ``stride`` apart: int64 (num_clips, num_frames).

    Training: one clip with a uniformly random start among the starts that fit. Test:
    ``num_clips`` clips whose starts are spread evenly from the first to the last start that fits
    (one clip: the centred one). A video shorter than the clip span
    ``(num_frames - 1) * stride + 1`` starts at frame 0 and its indices past the end are clamped
    to the last frame (``short="clamp"``) or wrapped around (``short="loop"``).
    """
    _check(video_frames, num_frames, num_clips, train, rng)
    if stride < 1:
        raise UsageError(f"stride must be >= 1, got {stride}")
    span = (num_frames - 1) * stride + 1
    slack = max(video_frames - span, 0)  # the last start that fits
    if train:
        starts = np.array([rng.integers(0, slack + 1)])
    elif num_clips == 1:
        starts = np.array([slack // 2])
    else:
        starts = np.round(np.arange(num_clips) * (slack / (num_clips - 1))).astype(np.int64)
    indices = starts[:, None] + np.arange(num_frames) * stride
    return _fit(indices.astype(np.int64), video_frames, short)


def uniform_indices(
    video_frames: int,
    num_frames: int,
    *,
    train: bool,
    num_clips: int = 1,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """TSN segment sampling, one frame per segment: int64 (num_clips, num_frames).

    The video is cut into ``num_frames`` equal segments ``[i*L, (i+1)*L)`` with ``L =
    video_frames / num_frames``. Training takes a uniformly random position in each segment; test
    clip ``c`` of ``num_clips`` takes position ``(c + 0.5) / num_clips`` through every segment
    (one clip: the centres). Videos with fewer frames than segments repeat frames; indices never
    leave [0, video_frames).
    """
    _check(video_frames, num_frames, num_clips, train, rng)
    seg = video_frames / num_frames
    starts = np.arange(num_frames) * seg
    if train:
        offsets = rng.random((1, num_frames))
    else:
        offsets = np.repeat(((np.arange(num_clips) + 0.5) / num_clips)[:, None], num_frames, axis=1)
    indices = np.floor(starts[None, :] + offsets * seg).astype(np.int64)
    return np.clip(indices, 0, video_frames - 1)


def sample_indices(
    sampling: str,
    video_frames: int,
    num_frames: int,
    *,
    train: bool,
    stride: int = 1,
    num_clips: int = 1,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Dispatch to :func:`dense_indices` (``"dense"``) or :func:`uniform_indices` (``"uniform"``)."""
    if sampling == "dense":
        return dense_indices(video_frames, num_frames, stride, train=train, num_clips=num_clips, rng=rng)
    if sampling == "uniform":
        return uniform_indices(video_frames, num_frames, train=train, num_clips=num_clips, rng=rng)
    raise UsageError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
