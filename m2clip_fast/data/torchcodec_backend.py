"""torchcodec decode backend (optional: ``pip install torchcodec``, which needs FFmpeg's shared libraries).

:func:`decode_frames_torchcodec` is the ``backend="torchcodec"`` of :func:`m2clip_fast.data.frames.decode_frames`:
torchcodec's C++ decoder seeks to the keyframe before each run of wanted frames and decodes forward, with
frame ``i`` addressed through the file's PyAV :class:`~m2clip_fast.data.decode.VideoIndex` (the caller passes
it; handed to torchcodec as its frame mappings, so torchcodec scans nothing itself). Frame ``i`` is thus the
same frame as with the PyAV backend, and each frame torchcodec returns is checked to carry the pts the index
lists for it.

The contract is PyAV's: the pixels equal ``decode_all_frames(path)[indices]``. torchcodec converts YUV to
RGB with swscale like PyAV, bit for bit for 8-bit planar YUV (tests/test_decode_matrix.py). Files where that
or its seeking was seen to differ are not served (:func:`unserved_reason`); :mod:`.frames` decodes them with
PyAV instead, as it does any request that fails a check here (:class:`NotServed`):

* files PyAV's index cannot show exact (packed-B-frame XviD/DivX AVIs, raw streams, H.264 in AVI, ...):
  torchcodec orders frames by pts, which these files do not give right;
* MPEG-TS: torchcodec returned other frames than asked (sought by pts in a stream it indexes by dts);
* AVIs whose codec reorders frames (MPEG-4 Part 2 with B-frames): torchcodec ran out of frames near the end;
* pixel formats other than 8-bit planar YUV (10-bit, NV12, ...): torchcodec's RGB differs from PyAV's by up
  to 47 levels at 10 bits (closer to the source, but not frame ``i`` of PyAV's decode);
* odd frame sizes: at an odd height torchcodec's RGB differed from PyAV's by up to 16 levels (a VP9 33x47 and
  33x48); odd widths are handed on as well, as a half chroma pixel at an edge is the same hazard.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from .errors import check_frame_indices, short_text

__all__ = [
    "TorchcodecUnavailableError",
    "NotServed",
    "torchcodec_available",
    "require_torchcodec",
    "unserved_reason",
    "decode_frames_torchcodec",
    "SERVED_PIXEL_FORMATS",
]

# the pixel formats whose RGB torchcodec's swscale conversion was seen equal to PyAV's, bit for bit
SERVED_PIXEL_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"})
_INSTALL_HINT = ("pip install torchcodec (the m2clip-fast[torchcodec] extra) and FFmpeg's shared libraries "
                 "(Debian/Ubuntu: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 "
                 "libavdevice59 libavfilter8, or any FFmpeg 4-8)")


class TorchcodecUnavailableError(UserError, ImportError):
    """torchcodec is not installed, or it cannot load FFmpeg's libraries (the commands print it as one line)."""


class NotServed(Exception):
    """torchcodec cannot give this request PyAV's frames; ``reason`` says why (the caller decodes with PyAV)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _unavailable_reason() -> Optional[str]:
    """Why torchcodec cannot decode here (one line), None when it can."""
    try:
        import torchcodec
        import torchcodec.decoders  # what decoding needs: its own imports can fail where torchcodec's do not
    except ImportError as exc:
        return f"decoder 'torchcodec' needs torchcodec, which is not importable ({short_text(exc)})"
    except OSError as exc:  # a torchcodec built for another torch fails to load its ops
        return f"torchcodec cannot load ({short_text(exc)})"
    if getattr(torchcodec, "ffmpeg_major_version", None) is None:  # it imports without FFmpeg, then cannot decode
        return "torchcodec found no FFmpeg libraries it can load"
    return None


def require_torchcodec() -> None:
    """Raise TorchcodecUnavailableError (with the install hint) unless torchcodec can decode here."""
    reason = _unavailable_reason()
    if reason is not None:
        raise TorchcodecUnavailableError(f"{reason}; {_INSTALL_HINT}")


def torchcodec_available() -> bool:
    """True when torchcodec is installed and has FFmpeg libraries to decode with."""
    return _unavailable_reason() is None


def _video_decoder_class():
    """torchcodec's VideoDecoder; TorchcodecUnavailableError (with the install hint) where it cannot decode."""
    require_torchcodec()
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder


def unserved_reason(index) -> str:
    """Why torchcodec does not decode the file of ``index`` (a VideoIndex), '' when it does."""
    if not index.exact:
        return f"frames decoded by PyAV's rules ({index.inexact_reason})"
    if index.container == "mpegts":
        return "torchcodec seeks MPEG-TS to other frames than asked"
    if index.container == "avi" and index.reorders:
        return "torchcodec loses frames of AVIs whose codec reorders frames"
    if index.pix_fmt not in SERVED_PIXEL_FORMATS:
        return f"torchcodec's RGB of pixel format {index.pix_fmt} differs from PyAV's"
    if index.width % 2 or index.height % 2:
        return f"torchcodec's RGB of odd frame sizes ({index.width}x{index.height}) differs from PyAV's"
    return ""


def _frame_mappings(index) -> str:
    """The index's frames as torchcodec's ``custom_frame_mappings`` JSON (ffprobe -show_frames' fields):
    pts, duration (to the next frame; the last repeats the one before) and keyframe flag, in presentation
    order."""
    pts = index.pts.astype(np.int64)
    step = pts[-1] - pts[-2] if pts.size > 1 else 1
    duration = np.diff(pts, append=pts[-1] + max(int(step), 1))
    keys = index.is_key[index.frame_pos]
    return json.dumps({"frames": [{"pts": int(p), "duration": int(d), "key_frame": int(k)}
                                  for p, d, k in zip(pts.tolist(), duration.tolist(), keys.tolist())]})


def _num_threads(threads: Optional[int]) -> int:
    """Codec threads: as the PyAV backend, 1 inside a DataLoader worker (the workers already use every core)
    and FFmpeg's choice (0) in a plain process, unless ``threads`` says."""
    if threads is not None:
        return threads
    return 1 if torch.utils.data.get_worker_info() is not None else 0


def decode_frames_torchcodec(path, indices: Sequence[int], *, index, threads: Optional[int] = None) -> torch.Tensor:
    """Decode ``indices`` (may repeat, any order) of ``path`` with torchcodec: uint8 (len(indices), H, W, 3) RGB.

    ``index``: the file's VideoIndex (frame count, pts, keyframes, stream). ``threads``: codec threads (None:
    automatic, see :func:`_num_threads`). Raises VideoDecodeError for an index out of range,
    TorchcodecUnavailableError without torchcodec, and :class:`NotServed` when the file is one torchcodec does
    not serve or a frame it returns is not the one asked for (other pts, size), or torchcodec fails.
    """
    video_decoder = _video_decoder_class()
    path = os.fspath(path)
    reason = unserved_reason(index)
    if reason:
        raise NotServed(reason)
    idx = check_frame_indices(indices, index.num_frames, path)
    if idx.size == 0:
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    wanted, position = np.unique(idx, return_inverse=True)
    try:
        decoder = video_decoder(path, stream_index=index.stream_index, dimension_order="NHWC",
                                num_ffmpeg_threads=_num_threads(threads), seek_mode="exact",
                                custom_frame_mappings=_frame_mappings(index))
        batch = decoder.get_frames_at(wanted.tolist())
    except (RuntimeError, ValueError, IndexError) as exc:  # what torchcodec raises on a file it cannot decode
        raise NotServed(f"torchcodec failed ({short_text(exc)})") from exc
    _check_frames(batch, wanted, index)
    return batch.data[torch.from_numpy(position.reshape(-1))]


def _check_frames(batch, wanted: np.ndarray, index) -> None:
    """NotServed unless ``batch`` holds the frames ``wanted`` (sorted unique indices): index.pts by pts,
    index.height x index.width in size."""
    if tuple(batch.data.shape[1:]) != (index.height, index.width, 3):
        raise NotServed(f"torchcodec returned frames of shape {tuple(batch.data.shape[1:])}")
    tb = index.time_base
    # torchcodec gives pts * time_base as a double; pts up to 2**50 ticks round back exactly
    got = np.round(batch.pts_seconds.numpy() * tb.denominator / tb.numerator).astype(np.int64)
    expected = index.pts[wanted]
    if got.shape != expected.shape or not np.array_equal(got, expected):
        bad = int(np.argmax(got != expected)) if got.shape == expected.shape else 0
        raise NotServed(f"torchcodec returned another frame than frame {int(wanted[bad])}")
