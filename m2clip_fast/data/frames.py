"""``decode_frames(path, indices, backend)`` and ``decode_sampled``: the one place that picks a decode backend.

``"pyav"`` (:mod:`.decode`) decodes sparsely on the CPU; ``"torchcodec"`` (:mod:`.torchcodec_backend`,
optional) decodes on the CPU with torchcodec's C++ decoder; ``"dali"`` (:mod:`.dali`, optional) decodes with
NVIDIA DALI, on the GPU when there is one. The torchcodec and DALI backends number frames by the PyAV packet
index (so frame ``i`` is the same frame with every backend) and get that index from here: the backends never
import each other. A request torchcodec does not serve (a format it gets wrong, a failed check) is decoded
by PyAV here, and counted (``DecodeStats.torchcodec_routed``). :func:`dali_gpu_problem` tells whether DALI
can decode on a GPU at all, before a run relies on it.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Tuple

import av
import numpy as np
import torch

from . import dali, decode, torchcodec_backend

BACKENDS = ("pyav", "torchcodec", "dali")


def decode_frames(path: decode.PathLike, indices: Sequence[int], backend: str = "pyav", **options) -> torch.Tensor:
    """uint8 (len(indices), H, W, 3) RGB: the frames at ``indices`` (presentation order; may repeat and be
    unsorted) of ``path``'s first video stream, equal to ``decode_all_frames(path)[indices]``.

    ``options`` go to the backend: ``threads``, ``stats`` for "pyav" (:func:`.decode.decode_frames`) and
    "torchcodec" (:func:`decode_sampled`), ``device`` for "dali" (:func:`.dali.decode_frames_dali`). Raises
    :class:`VideoDecodeError` for an unusable file or an index out of range, DALIUnavailableError for "dali"
    without DALI, TorchcodecUnavailableError for "torchcodec" without torchcodec.
    """
    if backend == "pyav":
        return decode.decode_frames(path, indices, **options)
    if backend == "torchcodec":
        requested = np.asarray(indices, dtype=np.int64).reshape(-1)
        return decode_sampled(path, lambda n: requested, backend="torchcodec", **options)[1]
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


def decode_sampled(path: decode.PathLike, choose: decode.Chooser, backend: str = "pyav", *,
                   threads: Optional[int] = None,
                   stats: Optional[decode.DecodeStats] = None) -> Tuple[np.ndarray, torch.Tensor]:
    """The frames at ``choose(n)`` of ``path``, a video of ``n`` frames: ``(indices, frames)``, int64 (K,) and
    uint8 (K, H, W, 3) RGB, as :func:`.decode.decode_sampled` (``choose`` may be called more than once, so it
    must depend on ``n`` alone), decoded by ``backend`` "pyav" or "torchcodec".

    "torchcodec" decodes the files it serves (:func:`.torchcodec_backend.unserved_reason`) and hands any
    other request to PyAV: a file PyAV's index cannot show exact, a format torchcodec gets wrong, a frame
    that fails its check, a torchcodec error (a broken file then raises PyAV's VideoDecodeError).
    """
    if backend == "pyav":
        return decode.decode_sampled(path, choose, threads=threads, stats=stats)
    if backend != "torchcodec":
        raise ValueError(f"decode_sampled decodes with 'pyav' or 'torchcodec', not {backend!r}")
    torchcodec_backend.require_torchcodec()  # before the file: without torchcodec, say so whatever the file
    path = os.fspath(path)
    local = decode.DecodeStats()
    try:
        index = decode.get_index(path, stats=local)
        if not torchcodec_backend.unserved_reason(index):
            try:
                idx = np.asarray(choose(index.num_frames), dtype=np.int64).reshape(-1)
                frames = torchcodec_backend.decode_frames_torchcodec(path, idx, index=index, threads=threads)
            except torchcodec_backend.NotServed:
                pass
            else:
                local.torchcodec_decodes += 1
                local.frames_returned += int(idx.size)
                return idx, frames
        local.torchcodec_routed += 1
        local.routed_files.add(path)
    finally:
        decode.account(local, stats)
    return decode.decode_sampled(path, choose, threads=threads, stats=stats)
