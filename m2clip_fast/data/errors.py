"""What every decode backend shares: the error a bad video raises, its reason in a few words, and the
check that requested frame indices exist. Backends import this module, never each other."""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from ..errors import UserError

PathLike = Union[str, os.PathLike]

REASON_CHARS = 160  # a reason is one line of skipped.jsonl / an error message, not a whole FFmpeg log


class VideoDecodeError(UserError, RuntimeError):
    """A video could not be decoded. ``path`` names the file, ``reason`` says why in a few words."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = str(reason)
        super().__init__(f"cannot decode {self.path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) when a DataLoader worker pickles the error
        return (type(self), (self.path, self.reason))


def short_text(text: str) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to :data:`REASON_CHARS` characters."""
    return " ".join(str(text).split())[:REASON_CHARS]


def check_frame_indices(indices: Sequence[int], n: int, path: str) -> np.ndarray:
    """``indices`` as int64 (K,), after checking each lies in [0, n) (else VideoDecodeError naming the first
    one out of range)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)]
        raise VideoDecodeError(path, f"frame index {int(bad[0])} out of range for {n} frames")
    return idx
