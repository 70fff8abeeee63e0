"""NVIDIA DALI decode backend (optional: the ``m2clip-fast[dali]`` extra, DALI's build for torch's CUDA).

:func:`decode_frames_dali` is the ``backend="dali"`` of :func:`m2clip_fast.data.frames.decode_frames`:
a DALI pipeline (``fn.decoders.video`` with per-sample ``frames``) decodes the requested frames of one
file. With CUDA it decodes on the GPU (``device="mixed"``, NVDEC: H.264, HEVC, VP8, VP9, AV1, MPEG-4),
on torch's current CUDA device; on the CPU DALI 2.x decodes only VP8, VP9 and MJPEG. The pieces here
(device and codec checks, pipeline building, DALI-to-torch copies) also serve :mod:`.dali_loader`.

Files are validated with their PyAV packet index first (cheap: demux only; the caller passes it), so
broken files raise :class:`~m2clip_fast.data.VideoDecodeError` with a clear reason instead of
invalidating the DALI pipeline, and so that frame ``i`` means the same frame as with the PyAV backend.
A pipeline DALI cannot build on its device (no CUDA driver, no GPU of that number) raises
:class:`DALIStartError`, which is no file's fault; :func:`gpu_start_problem` asks that question up front.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UsageError, UserError
from .errors import VideoDecodeError, check_frame_indices, short_text

__all__ = [
    "DALIUnavailableError",
    "DALIStartError",
    "dali_available",
    "dali_package",
    "require_dali",
    "current_device_id",
    "gpu_start_problem",
    "decode_frames_dali",
]

# Codecs DALI 2.x's CPU video decoder handles; everything else needs the mixed (NVDEC) backend.
_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})


def dali_package(cuda_version: Optional[str] = torch.version.cuda) -> str:
    """The DALI wheel built for the CUDA major version of torch (``cuda_version``, e.g. "13.0"):
    ``nvidia-dali-cuda130`` for CUDA 13, ``nvidia-dali-cuda120`` for CUDA 12; the newest for a CPU torch."""
    major = cuda_version.split(".")[0] if cuda_version else "13"
    return f"nvidia-dali-cuda{major}0"


class DALIUnavailableError(ImportError):
    """NVIDIA DALI is not installed or cannot be imported."""


class DALIStartError(UserError, RuntimeError):
    """DALI cannot build a pipeline on its device (no CUDA driver or NVDEC library, no such GPU)."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"DALI cannot start on {where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.where, self.reason))


def dali_api():
    """DALI's ``(fn, pipeline_def, types)``; DALIUnavailableError (with the install hint) without DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise DALIUnavailableError(f"backend 'dali' needs NVIDIA DALI, which is not importable ({exc}); "
                                   f"pip install {dali_package()} (DALI for torch's CUDA)") from exc
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


def current_device_id() -> Optional[int]:
    """The GPU a DALI pipeline decodes on: torch's current CUDA device (the trainer makes it the LOCAL_RANK
    GPU before building loaders), None without CUDA."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def pipeline_device_id(device: str, device_id: Optional[int] = None) -> Optional[int]:
    """DALI's ``device_id`` for a pipeline decoding on ``device``: None (a CPU-only pipeline) for "cpu",
    else ``device_id`` or, when that is None, :func:`current_device_id`."""
    if device == "cpu":
        return None
    return current_device_id() if device_id is None else int(device_id)


def define_pipeline(graph: Callable[[], Any], *, batch_size: int, num_threads: int, device: str,
                    device_id: Optional[int] = None):
    """The (not yet built) DALI pipeline of ``graph`` (a function defining its operators and returning the
    outputs) on ``device``'s GPU (:func:`pipeline_device_id`).

    Inputs come from ``feed_input`` one batch before each ``run`` (prefetch depth 1, DALI's dynamic
    executor): the overlap with training comes from running the pipeline on a background thread
    (:class:`~m2clip_fast.data.prefetch.Prefetcher`), which also keeps a failing batch's inputs at hand
    to find the file at fault."""
    _, pipeline_def, _ = dali_api()
    return pipeline_def(graph, batch_size=batch_size, num_threads=num_threads,
                        device_id=pipeline_device_id(device, device_id), exec_dynamic=True, prefetch_queue_depth=1)()


def build_pipeline(graph: Callable[[], Any], **options):
    """:func:`define_pipeline` (same arguments), built; DALIStartError when DALI cannot build it there."""
    pipe = define_pipeline(graph, **options)
    try:
        pipe.build()
    except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError and others for a device it cannot use
        where = "the CPU" if pipe.device_id is None else f"GPU {pipe.device_id}"
        raise DALIStartError(where, dali_error_text(exc)) from exc
    return pipe


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
        device = torch.device("cuda", dali_batch.device_id())
        out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor))


def dali_error_text(exc: BaseException) -> str:
    """The informative line of a DALI error: the one after "encountered:" (the operator's own
    message) when present, else the last line that is not DALI's generic pipeline notice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return short_text(lines[lines.index("encountered:") + 1])
    lines = [line for line in lines if not line.startswith(("Current pipeline object", "Critical error"))]
    return short_text(lines[-1]) if lines else type(exc).__name__


def batch_to_torch(batch, dtype: torch.dtype) -> torch.Tensor:
    """A whole DALI TensorList of equally shaped samples as one torch tensor (copied; a GPU output on its
    own GPU, copied on that GPU's current stream)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if isinstance(batch, TensorListGPU):
        # the dense tensor, not the list: feed_ndarray compares shape() with the target's, and a
        # TensorList's shape() is its per-sample shapes
        dense, device = batch.as_tensor(), torch.device("cuda", batch.device_id())
        out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(batch.as_tensor())).to(dtype)


def _frames_pipeline(device: str, device_id: Optional[int]):
    """The single-file pipeline: inputs "encoded" (the file's bytes) and "frames" (int32 indices)."""
    fn, _, types = dali_api()

    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, frames=frames, device=device)

    return build_pipeline(graph, batch_size=1, num_threads=1, device=device, device_id=device_id)


class _FramePipelines:
    """One single-sample decoding pipeline per (device, GPU), per process, rebuilt after a failure."""

    def __init__(self):
        self._pipes: Dict[Tuple[str, Optional[int]], Any] = {}
        self._lock = threading.Lock()

    def run(self, device: str, encoded: np.ndarray, frames: np.ndarray, path: str,
            device_id: Optional[int] = None) -> torch.Tensor:
        """uint8 (len(frames), H, W, 3) frames of one file (a CUDA tensor for "mixed"). DALIStartError when
        the pipeline cannot be built, VideoDecodeError naming ``path`` when decoding fails."""
        key = (device, pipeline_device_id(device, device_id))
        with self._lock:
            pipe = self._pipes.get(key) or _frames_pipeline(*key)
            self._pipes[key] = pipe
            try:
                pipe.feed_input("encoded", [encoded])
                pipe.feed_input("frames", [frames])
                (out,) = pipe.run()
                return _to_torch(out)
            except Exception as exc:  # noqa: BLE001 - DALI raises several types on a bad file
                # a failed DALI pipeline stays unusable: drop it so the next call builds afresh
                del self._pipes[key]
                raise VideoDecodeError(path, f"DALI decode failed ({dali_error_text(exc)})") from exc


PIPELINES = _FramePipelines()


def gpu_start_problem(encoded: np.ndarray, device_id: Optional[int]) -> Optional[str]:
    """None when a fresh GPU ("mixed") pipeline on GPU ``device_id`` (None: the current one) decodes frame 0 of
    ``encoded`` (the bytes of a small video NVDEC decodes, e.g. H.264), else why not, in one line (no CUDA
    driver, no NVDEC library: a container without the video driver capability). Makes no CUDA call of its
    own, so DALI itself answers, on any machine."""
    try:
        pipe = _frames_pipeline("mixed", device_id)
        pipe.feed_input("encoded", [encoded])
        pipe.feed_input("frames", [np.zeros(1, np.int32)])
        (out,) = pipe.run()
        out.as_cpu()  # the decode has finished
    except DALIStartError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - DALI raises several types when the decoder cannot start
        return dali_error_text(exc)
    return None


def decode_frames_dali(path: str, indices: Sequence[int], *, index, device: Optional[str] = None,
                       device_id: Optional[int] = None) -> torch.Tensor:
    """Decode ``indices`` of ``path`` with DALI: uint8 (len(indices), H, W, 3) RGB.

    ``index``: the file's :class:`~m2clip_fast.data.decode.VideoIndex` (its frame count, codec and size).
    ``device``: ``"mixed"`` (GPU decoding; the result is a CUDA tensor on GPU ``device_id``, by default
    torch's current device), ``"cpu"`` (VP8/VP9/MJPEG only) or None (GPU when CUDA is available). Indices
    may repeat and be unsorted. Raises :class:`DALIUnavailableError` without DALI, :class:`DALIStartError`
    when DALI cannot start on the device, and :class:`VideoDecodeError` for indices out of range and
    codecs the chosen device cannot decode.
    """
    dali_api()
    path = os.fspath(path)
    device = resolve_device(device)
    idx = check_frame_indices(indices, index.num_frames, path)
    check_codec(path, index.codec, device)
    if idx.size == 0:
        gpu = pipeline_device_id(device, device_id)
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8,
                           device="cpu" if gpu is None else torch.device("cuda", gpu))
    return PIPELINES.run(device, read_bytes(path), idx.astype(np.int32), path, device_id)
