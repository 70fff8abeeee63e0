"""NVIDIA DALI decode backend (optional: ``pip install nvidia-dali-cuda120``).

:func:`decode_frames_dali` is the ``backend="dali"`` of :func:`m2clip_fast.data.frames.decode_frames`:
a DALI pipeline (``fn.decoders.video`` with per-sample ``frames``) decodes the requested frames of one
file. With CUDA it decodes on the GPU (``device="mixed"``, NVDEC: H.264, HEVC, VP8, VP9, AV1, MPEG-4);
on the CPU DALI 2.x decodes only VP8, VP9 and MJPEG. The pieces here (device and codec checks, the
single-file pipelines, DALI-to-torch copies) also serve :mod:`.dali_loader`.

Files are validated with their PyAV packet index first (cheap: demux only; the caller passes it), so
broken files raise :class:`~m2clip_fast.data.VideoDecodeError` with a clear reason instead of
invalidating the DALI pipeline, and so that frame ``i`` means the same frame as with the PyAV backend.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..errors import UsageError
from .errors import VideoDecodeError, check_frame_indices, short_text

__all__ = [
    "DALIUnavailableError",
    "dali_available",
    "require_dali",
    "decode_frames_dali",
]

# Codecs DALI 2.x's CPU video decoder handles; everything else needs the mixed (NVDEC) backend.
_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
_INSTALL_HINT = "pip install nvidia-dali-cuda120 (the m2clip-fast[dali] extra)"


class DALIUnavailableError(ImportError):
    """NVIDIA DALI is not installed or cannot be imported."""


def dali_api():
    """DALI's ``(fn, pipeline_def, types)``; DALIUnavailableError (with the install hint) without DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise DALIUnavailableError(f"backend 'dali' needs NVIDIA DALI, which is not importable "
                                   f"({exc}); {_INSTALL_HINT}") from exc
    return fn, pipeline_def, types


def require_dali() -> None:
    """Raise DALIUnavailableError (with the install hint) unless NVIDIA DALI can be imported."""
    dali_api()


def dali_available() -> bool:
    """True when NVIDIA DALI can be imported."""
    try:
        dali_api()
    except DALIUnavailableError:
        return False
    return True


def resolve_device(device: Optional[str]) -> str:
    if device is None:
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise UsageError(f"DALI device must be 'cpu' or 'mixed' (GPU), got {device!r}")
    if device == "mixed" and not torch.cuda.is_available():
        raise UsageError("DALI device 'mixed' decodes on the GPU, but CUDA is not available")
    return device


def check_codec(path: str, codec: str, device: str) -> None:
    supported = _CPU_CODECS if device == "cpu" else _GPU_CODECS
    if codec not in supported:
        where = ("DALI's CPU decoder (VP8/VP9/MJPEG only); decode on a GPU or use backend='pyav'"
                 if device == "cpu" else "DALI's GPU decoder")
        raise VideoDecodeError(path, f"codec {codec} is not supported by {where}")


def read_bytes(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise VideoDecodeError(path, f"cannot read file ({exc.strerror or exc})") from exc


def _to_torch(dali_batch, sample: int = 0) -> torch.Tensor:
    """One sample of a DALI TensorList as a torch tensor (copied; on the GPU for GPU outputs)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = dali_batch[sample]
    if isinstance(dali_batch, TensorListGPU):
        out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device="cuda")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor))


def _dali_error_text(exc: BaseException) -> str:
    """The informative line of a DALI error: the one after "encountered:" (the operator's own
    message) when present, else the last line that is not DALI's generic pipeline notice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return short_text(lines[lines.index("encountered:") + 1])
    lines = [line for line in lines if not line.startswith(("Current pipeline object", "Critical error"))]
    return short_text(lines[-1]) if lines else type(exc).__name__


def batch_to_torch(batch, dtype: torch.dtype) -> torch.Tensor:
    """A whole DALI TensorList of equally shaped samples as one torch tensor (copied)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if isinstance(batch, TensorListGPU):
        # the dense tensor, not the list: feed_ndarray compares shape() with the target's, and a
        # TensorList's shape() is its per-sample shapes
        dense = batch.as_tensor()
        out = torch.empty(tuple(dense.shape()), dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(batch.as_tensor())).to(dtype)


class _FramePipelines:
    """One single-sample decoding pipeline per device, per process, rebuilt after a failure."""

    def __init__(self):
        self._pipes: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def _build(self, device: str):
        fn, pipeline_def, types = dali_api()

        @pipeline_def(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def frames_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, frames=frames, device=device)

        pipe = frames_pipeline()
        pipe.build()
        return pipe

    def run(self, device: str, encoded: np.ndarray, frames: np.ndarray, path: str) -> torch.Tensor:
        with self._lock:
            pipe = self._pipes.get(device) or self._build(device)
            self._pipes[device] = pipe
            try:
                pipe.feed_input("encoded", [encoded])
                pipe.feed_input("frames", [frames])
                (out,) = pipe.run()
                return _to_torch(out)
            except Exception as exc:  # noqa: BLE001 - DALI raises several types on a bad file
                # a failed DALI pipeline stays unusable: drop it so the next call builds afresh
                del self._pipes[device]
                raise VideoDecodeError(path, f"DALI decode failed ({_dali_error_text(exc)})") from exc


PIPELINES = _FramePipelines()


def decode_frames_dali(path: str, indices: Sequence[int], *, index, device: Optional[str] = None) -> torch.Tensor:
    """Decode ``indices`` of ``path`` with DALI: uint8 (len(indices), H, W, 3) RGB.

    ``index``: the file's :class:`~m2clip_fast.data.decode.VideoIndex` (its frame count, codec and size).
    ``device``: ``"mixed"`` (GPU decoding; the result is a CUDA tensor), ``"cpu"`` (VP8/VP9/MJPEG
    only) or None (GPU when CUDA is available). Indices may repeat and be unsorted. Raises
    :class:`DALIUnavailableError` without DALI and :class:`VideoDecodeError` for indices out of range and
    codecs the chosen device cannot decode.
    """
    dali_api()
    path = os.fspath(path)
    device = resolve_device(device)
    idx = check_frame_indices(indices, index.num_frames, path)
    check_codec(path, index.codec, device)
    if idx.size == 0:
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    return PIPELINES.run(device, read_bytes(path), idx.astype(np.int32), path)
