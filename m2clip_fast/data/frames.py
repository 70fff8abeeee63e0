"""``decode_frames(path, indices, backend)``: the one place that picks a decode backend.

``"pyav"`` (:mod:`.decode`) decodes sparsely on the CPU; ``"dali"`` (:mod:`.dali`, optional) decodes with
NVIDIA DALI, on the GPU when there is one. The DALI backend numbers frames by the PyAV packet index (so
frame ``i`` is the same frame with either backend) and gets that index from here: the backends never
import each other. :func:`dali_gpu_problem` tells whether DALI can decode on a GPU at all, before a run
relies on it.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import av
import numpy as np
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
        decode.num_frames(path)  # where the packets cannot tell the frame count, a full decode counts it
        return dali.decode_frames_dali(path, indices, index=decode.get_index(path), **options)
    raise ValueError(f"unknown decode backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def dali_gpu_problem(device_id: Optional[int]) -> Optional[str]:
    """None when DALI decodes on GPU ``device_id`` (None: torch's current device), else why not, in one
    line: a fresh DALI GPU pipeline decodes :func:`probe_clip`. It fails where there is no CUDA driver, or
    no NVDEC library (libnvcuvid: a container started without the video driver capability)."""
    return dali.gpu_start_problem(probe_clip(), device_id)


def probe_clip() -> np.ndarray:
    """The bytes of a 2-frame 64x64 grey H.264 MP4 (a codec every NVDEC decodes), encoded in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((96, 64), 128, np.uint8), format="yuv420p")  # Y, U, V planes
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return np.frombuffer(buffer.getvalue(), np.uint8)
