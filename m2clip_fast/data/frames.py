"""``decode_frames(path, indices, backend)``: the one place that picks a decode backend.

``"pyav"`` (:mod:`.decode`) decodes sparsely on the CPU; ``"dali"`` (:mod:`.dali`, optional) decodes with
NVIDIA DALI, on the GPU when there is one. The DALI backend numbers frames by the PyAV packet index (so
frame ``i`` is the same frame with either backend) and gets that index from here: the backends never
import each other.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import dali, decode

BACKENDS = ("pyav", "dali")


def decode_frames(path: decode.PathLike, indices: Sequence[int], backend: str = "pyav", **options) -> torch.Tensor:
    """uint8 (len(indices), H, W, 3) RGB: the frames at ``indices`` (presentation order; may repeat and be
    unsorted) of ``path``'s first video stream, equal to ``decode_all_frames(path)[indices]``.

    ``options`` go to the backend: ``threads``, ``stats`` for "pyav" (:func:`.decode.decode_frames`),
    ``device`` for "dali" (:func:`.dali.decode_frames_dali`). Raises :class:`VideoDecodeError` for an unusable
    file or an index out of range, DALIUnavailableError for "dali" without DALI.
    """
    if backend == "pyav":
        return decode.decode_frames(path, indices, **options)
    if backend == "dali":
        dali.require_dali()  # before the index: without DALI, say so whatever the file
        return dali.decode_frames_dali(path, indices, index=decode.get_index(path), **options)
    raise ValueError(f"unknown decode backend {backend!r}; expected one of {', '.join(BACKENDS)}")
