"""Frame-accurate sparse video decoding.

Frame ``i`` of a video is the ``i``-th frame that a plain decode of the whole video outputs
(``for frame in container.decode(stream)``): the decoder's output order, which is presentation
order for every well-formed stream, whatever the timestamps say. (They can be wrong: DivX/XviD
AVIs with packed B-frames label their decoded frames with shifted timestamps, so sorting by pts
would swap frames.) :func:`decode_all_frames` returns exactly those frames.

:func:`decode_frames` returns the same pixels while decoding only what the requested indices need,
where it can show that seeking lands on the right frame (the *fast path*). Per file it first builds
a :class:`VideoIndex` by demuxing packets only (no decoding) — the pts, the seek timestamp and the
keyframe flag of every frame — and caches it in a per-process LRU. The index admits the fast path
when every packet carries its own pts, no packet is an MPEG-4 placeholder (N-VOP) or holds packed
B-frames, no frame precedes the first keyframe and the container's declared frame count matches
the packets. Then, walking the requested frames in presentation order, it seeks to the keyframe
before the next needed frame when that keyframe lies ahead of the decoder's position, and keeps
decoding otherwise; every frame the decoder outputs is checked against the index (its pts listed,
strictly increasing after each seek, no wanted frame passed over).

Any other file, and any file where a check fails while decoding, is decoded through from the
start instead (the *fallback*: exact by definition, as costly as the official loader), counted in
:class:`DecodeStats`. That decode also *learns* the file (cached with its index, per process): its
frame count, and each frame's pts as the decoder stamps it, which name the frames even where they
are out of order. Later requests seek in that learned order, checking that every frame after a seek
is exactly the next one of the full decode (raw streams, whose pts are made up while demuxing,
always decode through). Only a file whose full decode fails is unreadable (:class:`VideoDecodeError`).
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import av
import av.video.reformatter
import numpy as np
import torch

from .errors import VideoDecodeError, check_frame_indices as _check_indices, short_text

__all__ = [
    "VideoDecodeError",
    "VideoIndex",
    "DecodeStats",
    "process_stats",
    "reset_process_stats",
    "account",
    "get_index",
    "num_frames",
    "decode_frames",
    "decode_sampled",
    "decode_all_frames",
    "iter_frames",
    "clear_index_cache",
    "INDEX_CACHE_SIZE",
]

PathLike = Union[str, os.PathLike]

INDEX_CACHE_SIZE = 2048
_MPEG4_VOP = b"\x00\x00\x01\xb6"  # an MPEG-4 Part 2 frame (VOP) start code
# FFmpeg's MPEG-4 decoder takes a packet this small for a not-coded frame (N-VOP): output nothing, or
# (packed B-frames) the B-frame held back from the packet before
_MAX_NVOP_SIZE = 19
# DivX 5 / XviD user data; a trailing 'p' marks a packed bitstream (as FFmpeg's decoder reads it)
_PACKED_USER_DATA = re.compile(rb"\x00\x00\x01\xb2DivX\d+(?:Build|b)\d+p")
_HEADER_BYTES = 512  # the sequence headers and user data before a keyframe's VOP
_WHOLE_PACKETS_CHECKED = 64
_AVFMT_NOTIMESTAMPS = 0x80  # libavformat: a format without timestamps (raw .h264, .m4v, ...)
_RAW_STREAM = "a raw stream without container timestamps"


@dataclass
class DecodeStats:
    """Decoding counters; every decoding function adds its counts to the one passed as ``stats``
    and to this process's total (:func:`process_stats`).

    ``frames_decoded`` counts every frame the codec produced (including those decoded only as
    references on the way to a wanted frame; unwanted non-reference frames are skipped by the
    codec and not counted), ``frames_returned`` the frames handed back,
    ``seeks`` the container seeks, ``seek_retries`` seeks that landed past the wanted keyframe and
    were redone earlier, ``index_builds`` the indexes built (cache misses), ``full_decodes`` the
    passes that decoded the video from its start. Per request (one :func:`decode_frames` or
    :func:`decode_sampled` call): ``sparse_decodes`` those answered by the fast path,
    ``fallbacks`` those decoded through from the start because the fast path could not be shown
    exact for the file; ``fallback_files`` the paths of the latter. Requests for the torchcodec backend
    (counted by :mod:`.frames`): ``torchcodec_decodes`` those torchcodec answered (its frames are not in
    ``frames_decoded``, which counts PyAV's codec), ``torchcodec_routed`` those answered by this module
    instead (a format torchcodec gets wrong, or a check that failed; counted here as well);
    ``routed_files`` the paths of the latter.
    """

    frames_decoded: int = 0
    frames_returned: int = 0
    seeks: int = 0
    seek_retries: int = 0
    index_builds: int = 0
    full_decodes: int = 0
    sparse_decodes: int = 0
    fallbacks: int = 0
    fallback_files: Set[str] = field(default_factory=set)
    torchcodec_decodes: int = 0
    torchcodec_routed: int = 0
    routed_files: Set[str] = field(default_factory=set)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, set() if isinstance(getattr(self, f.name), set) else 0)

    def add(self, other: "DecodeStats") -> None:
        """Add ``other``'s counts (and file sets) to these."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, set):
                mine |= getattr(other, f.name)
            else:
                setattr(self, f.name, mine + getattr(other, f.name))

    def copy(self) -> "DecodeStats":
        total = DecodeStats()
        total.add(self)
        return total


_PROCESS_STATS = DecodeStats()
_stats_lock = threading.Lock()


def process_stats() -> DecodeStats:
    """A snapshot of this process's decoding counters (every call since start or the last reset).
    A DataLoader worker has its own; the dataset reports each clip's path instead (see loader)."""
    with _stats_lock:
        return _PROCESS_STATS.copy()


def reset_process_stats() -> None:
    with _stats_lock:
        _PROCESS_STATS.reset()


def account(local: DecodeStats, stats: Optional[DecodeStats]) -> None:
    """Add one request's counters ``local`` to this process's total and to ``stats`` (when given)."""
    with _stats_lock:
        _PROCESS_STATS.add(local)
    if stats is not None:
        stats.add(local)


@dataclass(frozen=True)
class VideoIndex:
    """Per-frame metadata of a video stream, in presentation order (N frames).

    ``pts``: int64 (N,) sorted presentation timestamps in ``time_base`` units of the N frames
    the video shows. The demuxer may deliver M > N packets: an mp4/mov edit list that starts
    the video after its first packets (a stream-copy cut) marks those packets *discard*; they are
    decoded as references, but their frames are never output, so they are not frames here.
    Per packet (M), in presentation order: ``seek_ts``: int64 (M,) timestamp to seek to so that
    demuxing starts at that packet (its dts where the container has one: libavformat indexes
    mp4/avi by dts); ``is_key``: bool (M,) keyframe flags; ``key_before``: int64 (M,) position
    of the last keyframe at or before each packet, -1 when no keyframe precedes it (decode from
    the stream start). ``frame_pos``: int64 (N,) the packet position of each frame (equal to
    ``arange(N)`` when nothing is discarded).

    ``exact``: whether the fast path may address frames through these arrays; when False,
    ``inexact_reason`` says why, the arrays are only approximate (in packet pts order where
    packets have distinct pts, else in demux order) and frames are found by decoding through.
    ``decoded_frames``: the frame count a full decode found, once one ran in this process.
    ``learned``: after such a decode of an inexact file, an index of the same form over the decoded
    frames in output order, each known by the pts the decoder gave it (see :func:`_learned_view`):
    the fast path may seek in it, checking that every frame after a seek is the next one the full
    decode had; None where those pts did not single frames out.
    ``container``: libavformat's name of the container format ("avi", "mpegts", "matroska,webm", ...);
    ``pix_fmt``: the stream's pixel format as the header declares it (None where it does not);
    ``reorders``: whether the codec reorders frames (B-frames: ``has_b_frames``). Other backends decide
    from these which files they decode (:mod:`.torchcodec_backend`).
    """

    path: str
    stream_index: int
    codec: str
    width: int
    height: int
    time_base: Fraction
    average_rate: Optional[Fraction]
    duration: Optional[float]  # seconds, as the container states it
    pts: np.ndarray
    seek_ts: np.ndarray
    is_key: np.ndarray
    key_before: np.ndarray
    exact: bool
    inexact_reason: str
    first_seek_ts: int
    packet_pts: np.ndarray  # int64 (M,): every packet's pts, in presentation order
    frame_pos: np.ndarray
    decoded_frames: Optional[int] = None
    learned: Optional["VideoIndex"] = None
    container: str = ""
    pix_fmt: Optional[str] = None
    reorders: bool = False

    @property
    def num_frames(self) -> Optional[int]:
        """The number of frames: the shown packets when ``exact``, else what a full decode
        counted (None until one ran; :func:`num_frames` runs one)."""
        return int(self.pts.shape[0]) if self.exact else self.decoded_frames


# --------------------------------------------------------------------------------------------
# error handling


def _reason(exc: BaseException) -> str:
    return short_text(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


def _open(path: str) -> "av.container.InputContainer":
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoDecodeError(path, f"cannot open container ({_reason(exc)})") from exc


@contextmanager
def _as_decode_error(path: str) -> Iterator[None]:
    """Turn any failure on an odd file into a VideoDecodeError (the promise callers count on to
    skip the file): FFmpeg errors, and PyAV's or numpy's own (ValueError, IndexError,
    AttributeError on a stream without a decoder, MemoryError for absurd sizes, ...)."""
    try:
        yield
    except (VideoDecodeError, _NotExact):
        raise
    except av.FFmpegError as exc:
        raise VideoDecodeError(path, _reason(exc)) from exc
    except Exception as exc:
        raise VideoDecodeError(path, f"{type(exc).__name__}: {_reason(exc)}") from exc


def _video_stream(container, path: str):
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec (tag) this FFmpeg has no decoder for
        raise VideoDecodeError(path, "no decoder for the video codec")
    return stream


def _configure_threads(stream, threads: Optional[int]) -> None:
    """Choose codec threading before the decoder is opened.

    ``threads=None`` means 1 thread inside a DataLoader worker (the workers already use every
    core; codec threads on top only add contention and frame-thread latency) and FFmpeg's
    automatic frame+slice threading in a plain process.
    """
    if threads is None:
        threads = 1 if torch.utils.data.get_worker_info() is not None else 0
    ctx = stream.codec_context
    if threads == 1:
        ctx.thread_count = 1
    else:
        ctx.thread_type = "AUTO"
        ctx.thread_count = threads


# --------------------------------------------------------------------------------------------
# index


_cache: "OrderedDict[Tuple[str, int, int], VideoIndex]" = OrderedDict()
_cache_lock = threading.Lock()


def clear_index_cache() -> None:
    """Forget every cached :class:`VideoIndex` of this process."""
    with _cache_lock:
        _cache.clear()


def _cache_key(path: str) -> Tuple[str, int, int]:
    st = os.stat(path)  # mtime and size: a rewritten file gets a fresh index
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def _seek_targets(pts: np.ndarray, demux_ts: np.ndarray, is_key: np.ndarray, by_dts: bool) -> np.ndarray:
    """The timestamp to seek to for each keyframe (int64 (N,), presentation order).

    Demuxers compare a seek target with different per-packet times: matroska with the pts, avi
    with the dts, mp4 with the dts shifted by the B-frame delay (about the pts). A keyframe's
    pts is at or past every one of these for that keyframe, so seeking to it lands on it unless
    the next keyframe's dts is already <= that pts (keyframes a B-frame delay apart); then its
    own dts is the safer target. ``by_dts`` (mpegts, which has no index and stops at the first
    packet at or past the target's dts, keyframe or not): always the dts. A landing one keyframe
    late is caught and redone by the decoder.
    """
    seek = demux_ts.copy()
    if by_dts:
        return seek
    keys = np.nonzero(is_key)[0]
    nxt = np.append(demux_ts[keys[1:]], np.iinfo(np.int64).max)
    use_pts = pts[keys] < nxt
    seek[keys[use_pts]] = pts[keys[use_pts]]
    return seek


def _checked_packets(container, stream, path: str) -> Iterator:
    """The stream's packets, ending with the flush packet; raises on corrupt or missing data."""
    count = 0
    end = None  # the latest packet end (pts + duration) seen
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None:  # the end-of-stream flush packet
            # the container header (mp4, avi) declares the frame count; 0 where unknown (webm)
            declared = stream.frames
            if declared and count < declared and not _reaches_end(stream, end):
                raise VideoDecodeError(path, f"truncated: {count} of {declared} frames present")
        elif packet.is_corrupt:
            raise VideoDecodeError(path, f"corrupt or truncated packet at frame {count}")
        else:
            count += 1
            if packet.pts is not None:
                stop = packet.pts + (packet.duration or 0)
                end = stop if end is None else max(end, stop)
        yield packet


def _reaches_end(stream, end: Optional[int]) -> bool:
    """Whether packets reached the stream's declared end: then frames missing from the declared
    count were dropped inside the video (an AVI's empty 'drop frame' chunks, which the demuxer
    skips), not cut off its end."""
    duration = stream.duration
    if end is None or not duration:
        return False
    return end >= (stream.start_time or 0) + duration


def _placeholder_or_packed(packet, position: int) -> bool:
    """Whether an MPEG-4 Part 2 packet shows the DivX/XviD layout that breaks timestamp seeking: a
    not-coded placeholder (N-VOP), the 'packed bitstream' user data (``DivX503b1393p``: a P-frame and the
    next B-frame share a packet, the B-frame decoded with the next packet), or two frames in one packet.

    Checked without copying the packet, except its first bytes (keyframes) and the first packets whole.
    """
    if packet.size <= _MAX_NVOP_SIZE:
        return True
    if packet.is_keyframe and _PACKED_USER_DATA.search(memoryview(packet)[:_HEADER_BYTES].tobytes()):
        return True
    return position < _WHOLE_PACKETS_CHECKED and bytes(packet).count(_MPEG4_VOP) > 1


def _inexact_reason(container, stream, pts: List[Optional[int]], keys: List[bool], mpeg4_placeholders: bool) -> str:
    """Why a decoder's output might not be the index's frames one to one ('' when nothing says so).
    ``pts`` and ``keys`` are per packet, in demux (decode) order."""
    if container.format.flags & _AVFMT_NOTIMESTAMPS:
        return _RAW_STREAM
    if any(p is None for p in pts):
        return "packets without timestamps"
    if len(set(pts)) != len(pts):
        return "packets with duplicate timestamps"
    if mpeg4_placeholders:
        return "MPEG-4 placeholder (N-VOP) or packed B-frame packets"
    if stream.codec_context.has_b_frames and len(pts) > 2 and all(a < b for a, b in zip(pts, pts[1:])):
        # the codec reorders frames, yet the pts follow decode order: the demuxer made them up (AVI)
        return "timestamps in decode order although the codec reorders frames"
    if not keys[0]:
        return "the stream does not start with a keyframe"
    first_key_pts = pts[0]  # the first packet is a keyframe; a frame shown before it is a leading
    if min(pts) < first_key_pts:  # frame whose references precede the stream: decoders may drop it
        return "frames shown before the first keyframe"
    declared = stream.frames
    if declared and declared != len(pts):
        return f"the container declares {declared} frames, the stream has {len(pts)} packets"
    return ""


def _build_index(container, stream, path: str) -> VideoIndex:
    pts: List[Optional[int]] = []
    dts: List[Optional[int]] = []
    keys: List[bool] = []
    discard: List[bool] = []
    check_mpeg4 = stream.codec_context.name == "mpeg4"
    placeholders = False
    try:
        for packet in _checked_packets(container, stream, path):
            if packet.size == 0 and packet.pts is None:
                continue
            pts.append(packet.pts)
            dts.append(packet.dts)
            keys.append(bool(packet.is_keyframe))
            discard.append(bool(packet.is_discard))
            if check_mpeg4 and not placeholders:
                placeholders = _placeholder_or_packed(packet, len(pts) - 1)
    except av.FFmpegError as exc:
        raise VideoDecodeError(path, f"demux failed after {len(pts)} frames ({_reason(exc)})") from exc
    if not pts or all(discard):
        raise VideoDecodeError(path, "zero frames")

    reason = _inexact_reason(container, stream, pts, keys, placeholders)
    if all(p is not None for p in pts) and len(set(pts)) == len(pts):
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    else:  # no presentation order to be had from the packets
        order = np.arange(len(pts))
    demux_ts = [d if d is not None else p for p, d in zip(pts, dts)]
    known_ts = [t for t in demux_ts if t is not None]
    pts_arr = np.asarray([p if p is not None else i for i, p in enumerate(pts)], dtype=np.int64)[order]
    demux_arr = np.asarray([t if t is not None else 0 for t in demux_ts], dtype=np.int64)[order]
    is_key = np.asarray(keys, dtype=bool)[order]
    seek_ts = _seek_targets(pts_arr, demux_arr, is_key, by_dts=container.format.name == "mpegts")
    key_before = np.maximum.accumulate(np.where(is_key, np.arange(len(pts)), -1))
    frame_pos = np.nonzero(~np.asarray(discard, dtype=bool)[order])[0].astype(np.int64)
    rate = stream.average_rate
    return VideoIndex(
        path=path,
        stream_index=stream.index,
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        time_base=stream.time_base,
        average_rate=Fraction(rate) if rate else None,
        duration=_duration(container, stream),
        pts=pts_arr[frame_pos],
        seek_ts=seek_ts,
        is_key=is_key,
        key_before=key_before,
        exact=not reason,
        inexact_reason=reason,
        first_seek_ts=min(known_ts) if known_ts else 0,
        packet_pts=pts_arr,
        frame_pos=frame_pos,
        container=container.format.name,
        pix_fmt=stream.codec_context.pix_fmt,
        reorders=bool(stream.codec_context.has_b_frames),
    )


def _duration(container, stream) -> Optional[float]:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _cached_index(path: str) -> Optional[VideoIndex]:
    try:
        key = _cache_key(path)
    except OSError:
        return None
    with _cache_lock:
        index = _cache.get(key)
        if index is not None:
            _cache.move_to_end(key)
        return index


def _store_index(path: str, index: VideoIndex) -> None:
    key = _cache_key(path)
    with _cache_lock:
        _cache[key] = index
        _cache.move_to_end(key)
        while len(_cache) > INDEX_CACHE_SIZE:
            _cache.popitem(last=False)


def get_index(path: PathLike, *, stats: Optional[DecodeStats] = None) -> VideoIndex:
    """The :class:`VideoIndex` of ``path``'s first video stream (cached per process).

    Builds it by demuxing every packet once without decoding. Raises :class:`VideoDecodeError`
    for missing, unreadable, truncated or zero-frame files.
    """
    path = os.fspath(path)
    index = _cached_index(path)
    if index is not None:
        return index
    local = DecodeStats()
    try:
        with _as_decode_error(path):
            container = _open(path)
            with container:
                return _index_with(container, path, local)
    finally:
        account(local, stats)


def _index_with(container, path: str, stats: DecodeStats) -> VideoIndex:
    index = _cached_index(path)
    if index is None:
        index = _build_index(container, _video_stream(container, path), path)
        _store_index(path, index)
        stats.index_builds += 1
    return index


def _remember(path: str, index: VideoIndex, **changes) -> VideoIndex:
    """``index`` with ``changes``, cached in its place (what a decode learned about the file)."""
    index = replace(index, **changes)
    _store_index(path, index)
    return index


def num_frames(path: PathLike, *, stats: Optional[DecodeStats] = None) -> int:
    """Number of frames of ``path``'s first video stream: from its (cached) index, or, for a file
    the fast path cannot address (see :class:`VideoIndex`), by decoding it once and caching the count
    (and the learned index)."""
    path = os.fspath(path)
    index = get_index(path, stats=stats)
    if index.num_frames is not None:
        return index.num_frames
    local = DecodeStats()
    labels: List[Optional[int]] = []
    key_frames: List[bool] = []
    try:
        with _as_decode_error(path):
            for frame in _frames_in_order(path, None, local):
                labels.append(frame.pts)
                key_frames.append(frame.key_frame)
    finally:
        account(local, stats)
    return _remember(path, index, decoded_frames=len(labels),
                     learned=_learned_view(index, labels, key_frames)).num_frames


# --------------------------------------------------------------------------------------------
# decoding


class _Reformatters(threading.local):
    """One swscale context holder per thread, reused for every frame.

    ``frame.to_ndarray(format="rgb24")`` builds a new context for each frame, with an automatic (thread
    pool) thread count: 0.46 ms per 64x64 frame, against 0.004 ms reusing one single-threaded context
    (same pixels). DataLoader workers each convert their own clips, so one thread per conversion is right.
    """

    def __init__(self):
        self.reformatter = av.video.reformatter.VideoReformatter()


_REFORMATTERS = _Reformatters()


def _to_rgb(frame) -> np.ndarray:
    return _REFORMATTERS.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _stack(path: str, frames: Dict[int, np.ndarray], idx: np.ndarray, height: int, width: int) -> torch.Tensor:
    if idx.size == 0:
        return torch.empty((0, height, width, 3), dtype=torch.uint8)
    shapes = {frames[int(i)].shape for i in np.unique(idx)}
    if len(shapes) != 1:
        raise VideoDecodeError(path, f"frame size changes within the video {sorted(shapes)}")
    return torch.from_numpy(np.stack([frames[int(i)] for i in idx]))


def _frames_in_order(path: str, threads: Optional[int], stats: DecodeStats) -> Iterator:
    """The video's frames as PyAV frames (not yet converted), in decoder output order: frame ``i``
    is the ``i``-th yielded. Closing the generator early stops the decode."""
    container = _open(path)
    count = 0
    with container:
        stream = _video_stream(container, path)
        _configure_threads(stream, threads)
        stats.full_decodes += 1
        try:
            for packet in _checked_packets(container, stream, path):
                for frame in packet.decode():
                    count += 1
                    stats.frames_decoded += 1
                    yield frame
        except av.FFmpegError as exc:
            raise VideoDecodeError(path, f"decode failed at frame {count} ({_reason(exc)})") from exc
    if not count:
        raise VideoDecodeError(path, "zero frames")


def iter_frames(path: PathLike, *, threads: Optional[int] = None,
                stats: Optional[DecodeStats] = None) -> Iterator["av.VideoFrame"]:
    """Every frame of a plain decode of ``path``, as PyAV frames in output order (frame ``i`` is the
    ``i``-th yielded): what the fallback decodes, for callers that want to walk a whole video.
    Raises :class:`VideoDecodeError` where the decode fails."""
    path = os.fspath(path)
    local = DecodeStats()
    try:
        with _as_decode_error(path):
            yield from _frames_in_order(path, threads, local)
    finally:
        account(local, stats)


def _select(path: str, decoded: list, indices, stats: DecodeStats) -> torch.Tensor:
    """uint8 (len(indices), H, W, 3): the requested frames of a fully decoded video."""
    idx = np.arange(len(decoded)) if indices is None else _check_indices(indices, len(decoded), path)
    # like the official loader, convert only the frames asked for
    rgb = {int(i): _to_rgb(decoded[int(i)]) for i in np.unique(idx)}
    stats.frames_returned += int(idx.size)
    return _stack(path, rgb, idx, decoded[0].height, decoded[0].width)


def decode_all_frames(
    path: PathLike,
    indices: Optional[Sequence[int]] = None,
    *,
    threads: Optional[int] = None,
    stats: Optional[DecodeStats] = None,
) -> torch.Tensor:
    """Decode the whole video (the official M²-CLIP approach) and return its frames in output order.

    Returns uint8 (N, H, W, 3) RGB for all N frames, or (len(indices), H, W, 3) for the requested
    ``indices`` (which, like the official loader, are the only frames converted to RGB). This is
    the baseline the benchmarks compare against, and the definition of frame ``i`` that
    :func:`decode_frames` follows.
    """
    path = os.fspath(path)
    local = DecodeStats()
    try:
        with _as_decode_error(path):
            return _select(path, list(_frames_in_order(path, threads, local)), indices, local)
    finally:
        account(local, stats)


def _prepend(first, rest: Iterator) -> Iterator:
    # a generator rather than itertools.chain, so that close() reaches the demuxing generator
    yield first
    yield from rest


class _NotExact(Exception):
    """The decoder's output disagrees with the index: the fast path cannot be shown right here."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _SparseDecoder:
    """Seeks and decodes the frames of one open container for one :func:`decode_frames` call.

    Raises :class:`_NotExact` whenever the decoder's output is not what the index predicts.
    """

    def __init__(self, container, stream, index: VideoIndex, path: str, stats: DecodeStats, strict: bool = False):
        self.container, self.stream, self.index, self.path = container, stream, index, path
        # strict (a learned index): every frame is decoded, and each after a seek must be the next one
        self.stats, self.strict = stats, strict
        # frames are handled here by packet position (see VideoIndex), mapped back at the end
        self.pts_to_idx = {int(p): i for i, p in enumerate(index.packet_pts)}
        self.wanted_pts: set = set()

    def _frame(self, position: int) -> int:
        """The frame index of a (shown) packet position."""
        return int(np.searchsorted(self.index.frame_pos, position))

    def _frames_after_seek(self, seek_ts: int) -> Iterator[Tuple[int, object]]:
        """(index, frame) in decoder output order after seeking the demuxer to ``seek_ts``."""
        # seek() also flushes the codec, so no frame from before the jump comes out after it
        try:
            self.container.seek(int(seek_ts), stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise _NotExact(f"cannot seek ({_reason(exc)})") from exc
        self.stats.seeks += 1
        ctx = self.stream.codec_context
        last = -1
        try:
            for packet in self.container.demux(self.stream):
                # a non-reference frame (most B-frames) that is not wanted can be dropped by the
                # codec unseen: nothing depends on it. A frame's pts is its packet's pts.
                wanted = self.strict or packet.pts is None or packet.pts in self.wanted_pts
                ctx.skip_frame = "DEFAULT" if wanted else "NONREF"
                for frame in packet.decode():
                    self.stats.frames_decoded += 1
                    idx = self.pts_to_idx.get(frame.pts)
                    if idx is None:
                        raise _NotExact(f"decoded a frame with pts {frame.pts} that no packet has")
                    if idx <= last:  # presentation order, as the index has it, must only grow
                        raise _NotExact("decoder output not in the packets' presentation order")
                    last = idx
                    yield idx, frame
        except av.FFmpegError as exc:  # the decode from the start tells a broken file from a bad seek
            raise _NotExact(f"decode error after a seek ({_reason(exc)})") from exc

    def start_at(self, key: int, target: int) -> Iterator[Tuple[int, object]]:
        """Frames from keyframe ``key`` (-1: stream start) on, such that ``target`` will follow
        (both packet positions).

        A demuxer may land past the requested keyframe (an inexact seek index, e.g. a webm
        without cues); then the seek is redone from the keyframe before, and finally from the
        stream start, instead of returning wrong frames.
        """
        frame_pos = self.index.frame_pos
        candidates = [key]
        if key > 0 and self.index.key_before[key - 1] >= 0:
            candidates.append(int(self.index.key_before[key - 1]))
        if candidates[-1] != -1:
            candidates.append(-1)
        for k in candidates:
            seek_ts = self.index.first_seek_ts if k < 0 else int(self.index.seek_ts[k])
            frames = self._frames_after_seek(seek_ts)
            first = next(frames, None)
            # landing on or before the keyframe is fine (the frames before it are skipped); a
            # first frame past it means frames we need were jumped over. Discarded packets (an
            # edit list's head) output nothing: the first frame then is the first one shown.
            limit = int(frame_pos[np.searchsorted(frame_pos, k)]) if k >= 0 else target
            if first is not None and first[0] <= limit:
                return _prepend(first, frames)
            frames.close()
            self.stats.seek_retries += 1
        raise _NotExact(f"cannot reach frame {self._frame(target)} by seeking")

    def decode(self, wanted_frames: np.ndarray) -> Dict[int, np.ndarray]:
        """RGB arrays (H, W, 3) uint8 for the sorted unique frame indices ``wanted_frames``."""
        wanted = self.index.frame_pos[wanted_frames]  # packet positions, still sorted
        got: Dict[int, np.ndarray] = {}
        wanted_set = set(int(i) for i in wanted)
        self.wanted_pts = {int(self.index.packet_pts[i]) for i in wanted_set}
        frames: Optional[Iterator] = None
        pos = -1  # highest presentation index the decoder has produced since the last seek
        floor = 0  # below this, frames after a seek are open-GOP leading frames: unusable
        expect = -1  # strict: the position the next usable frame must have (-1: the seek's keyframe)
        try:
            for j in (int(i) for i in wanted):
                if j in got:
                    continue
                key = int(self.index.key_before[j])
                # seek when the keyframe that j needs lies beyond the decoder's next frame: the frames
                # in between would be decoded for nothing; otherwise decoding through costs the same
                # or less and keeps the frames already in the decoder's pipeline
                if frames is None or key > pos + 1:
                    if frames is not None:
                        frames.close()
                    frames = self.start_at(key, j)
                    pos, floor, expect = -1, max(key, 0), -1
                while j not in got:
                    item = next(frames, None)
                    if item is None:
                        raise _NotExact(f"the stream ended before frame {self._frame(j)}")
                    idx, frame = item
                    if idx < floor:
                        if self.strict and expect >= 0:
                            raise _NotExact("a frame before the keyframe came after it")
                        continue
                    if self.strict:
                        if idx != (floor if expect < 0 else expect):
                            raise _NotExact("decoded frames not in the full decode's order")
                        if expect < 0 and key >= 0 and not frame.key_frame:  # pts shifted since the seek
                            raise _NotExact("the frame after a seek is not the keyframe")
                        expect = idx + 1
                    pos = max(pos, idx)
                    if idx in wanted_set and idx not in got:
                        got[idx] = _to_rgb(frame)
                    if idx > j and j not in got:  # output order only grows: j will not come
                        raise _NotExact(f"frame {self._frame(j)} was not output")
        finally:
            if frames is not None:
                frames.close()
        return {int(f): got[int(p)] for f, p in zip(wanted_frames, wanted)}


Chooser = Callable[[int], Sequence[int]]


def decode_frames(
    path: PathLike,
    indices: Sequence[int],
    *,
    threads: Optional[int] = None,
    stats: Optional[DecodeStats] = None,
) -> torch.Tensor:
    """Decode the frames at ``indices`` of ``path``'s first video stream.

    Returns uint8 (len(indices), H, W, 3) RGB, in the order requested; indices may repeat and be
    unsorted. The pixels equal ``decode_all_frames(path)[indices]``, decoded sparsely on the CPU
    where that is exact, else decoded through (see the module docstring;
    :func:`m2clip_fast.data.frames.decode_frames` picks this or another backend). ``threads``: codec
    threads (None: automatic). ``stats``: a :class:`DecodeStats` to accumulate counters into
    (``sparse_decodes`` / ``fallbacks`` tell which path answered).

    Raises :class:`VideoDecodeError` (missing, unreadable, corrupt, truncated, zero-frame file or
    an index out of range).
    """
    path = os.fspath(path)
    requested = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not requested.size:  # nothing to decode, whatever the file needs
        index = get_index(path, stats=stats)
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    return decode_sampled(path, lambda n: requested, threads=threads, stats=stats)[1]


def decode_sampled(
    path: PathLike,
    choose: Chooser,
    *,
    threads: Optional[int] = None,
    stats: Optional[DecodeStats] = None,
) -> Tuple[np.ndarray, torch.Tensor]:
    """The frames at ``choose(n)`` of ``path``, a video of ``n`` frames: ``(indices, frames)``,
    int64 (K,) and uint8 (K, H, W, 3) RGB.

    For a file whose frame count only a full decode tells, that one decode both counts and
    delivers the frames. ``choose`` may be called twice (again with the true count when the
    index's proves wrong), so it must depend on ``n`` alone (reseed any generator inside).
    Raises :class:`VideoDecodeError` like :func:`decode_frames`.
    """
    path = os.fspath(path)
    local = DecodeStats()
    try:
        with _as_decode_error(path):
            return _decode_sampled(path, choose, threads, local)
    finally:
        account(local, stats)


def _decode_sampled(path: str, choose: Chooser, threads: Optional[int], stats: DecodeStats):
    container = _open(path)
    with container:
        index = _index_with(container, path, stats)
        view = index if index.exact else index.learned
        if view is not None:
            n = view.num_frames
            idx = _check_indices(choose(n), n, path)
            wanted = np.unique(idx)
            try:
                got = _sparse_frames(container, view, wanted, path, threads, stats, strict=not index.exact)
            except _NotExact as exc:  # a learned view that fails is dropped too
                reason = exc.reason if index.exact else index.inexact_reason
                index = _remember(path, index, exact=False, inexact_reason=reason, learned=None)
            else:
                stats.sparse_decodes += 1
                stats.frames_returned += int(idx.size)
                return idx, _stack(path, got, idx, index.height, index.width)
    stats.fallbacks += 1
    stats.fallback_files.add(path)
    return _decode_through(path, index, choose, threads, stats)


def _sparse_frames(container, index: VideoIndex, wanted: np.ndarray, path: str, threads: Optional[int],
                   stats: DecodeStats, strict: bool) -> Dict[int, np.ndarray]:
    if not wanted.size:
        return {}
    stream = _video_stream(container, path)
    _configure_threads(stream, threads)
    return _SparseDecoder(container, stream, index, path, stats, strict).decode(wanted)


def _learned_view(index: VideoIndex, labels: List[Optional[int]], key_frames: List[bool]) -> Optional[VideoIndex]:
    """An index over the frames of a full decode by output position, from their pts (``labels``) and
    keyframe flags, in output order.

    A decoder stamps each frame with the pts of the packet that started it; after a seek to a
    keyframe the same packets follow, so each frame from there on gets the same pts as in the full
    decode, whatever those pts mean (packed B-frames make them out of order). Distinct pts thus name
    the frames; the keyframes are the decoded keyframes whose pts is a keyframe packet's, sought like
    it. Leading frames decoded after a seek without their references keep their own pts too, which
    place them before the keyframe: skipped. None when the pts do not single out every frame, and
    for raw streams, whose pts are the demuxer's count from wherever it starts.
    """
    if index.inexact_reason == _RAW_STREAM:
        return None
    packet_pts = index.packet_pts
    sorted_packets = packet_pts.size < 2 or bool(np.all(np.diff(packet_pts) > 0))
    if any(p is None for p in labels) or len(set(labels)) != len(labels) or not sorted_packets:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    packet = np.minimum(np.searchsorted(packet_pts, labels), packet_pts.size - 1)
    keys = (packet_pts[packet] == labels) & index.is_key[packet] & np.asarray(key_frames, dtype=bool)
    if not keys.any():
        return None
    n = len(labels)
    return replace(index, pts=labels, seek_ts=np.where(keys, index.seek_ts[packet], 0), is_key=keys,
                   key_before=np.maximum.accumulate(np.where(keys, np.arange(n), -1)), exact=True,
                   inexact_reason="", packet_pts=labels, frame_pos=np.arange(n, dtype=np.int64),
                   decoded_frames=n, learned=None)


def _decode_through(path: str, index: VideoIndex, choose: Chooser, threads: Optional[int],
                    stats: DecodeStats) -> Tuple[np.ndarray, torch.Tensor]:
    """The fallback: frames counted off a decode from the start. With the count known (an earlier
    full decode in this process), decoding stops after the last wanted frame and keeps only the
    wanted ones; otherwise the whole video is decoded, and its count cached."""
    n = index.decoded_frames
    if n is None:
        decoded = list(_frames_in_order(path, threads, stats))
        _remember(path, index, decoded_frames=len(decoded),
                  learned=_learned_view(index, [f.pts for f in decoded], [f.key_frame for f in decoded]))
        idx = _check_indices(choose(len(decoded)), len(decoded), path)
        return idx, _select(path, decoded, idx, stats)
    idx = _check_indices(choose(n), n, path)
    wanted = set(int(i) for i in idx)
    got: Dict[int, np.ndarray] = {}
    if wanted:
        frames = _frames_in_order(path, threads, stats)
        try:
            for position, frame in enumerate(frames):
                if position in wanted:
                    got[position] = _to_rgb(frame)
                    if len(got) == len(wanted):
                        break
        finally:
            frames.close()
    missing = sorted(wanted - set(got))
    if missing:
        raise VideoDecodeError(path, f"frame {missing[0]} missing: the video decoded to fewer frames than "
                                     f"the {n} counted before")
    stats.frames_returned += int(idx.size)
    return idx, _stack(path, got, idx, index.height, index.width)


def bilinear_bt601_rgb(path: PathLike) -> np.ndarray:
    """Every frame of ``path`` (in the order of a plain decode) as float64 (N, H, W, 3) RGB, rounded to levels:
    PyAV's YUV 4:2:0 planes converted with BT.601 limited-range coefficients and bilinear chroma.

    The conversion DALI's decoder applies, computed independently of it (our own decode path uses
    swscale, which repeats each chroma sample over its 2×2 block instead); VP9's YUV output is
    bit-exact by the codec spec, so DALI's RGB must equal this within a level of rounding.
    """
    with av.open(os.fspath(path)) as container:
        frames = list(container.decode(video=0))
    out = []
    for f in frames:
        h, w = f.height, f.width
        planes = f.to_ndarray(format="yuv420p").astype(np.float64)
        y = planes[:h]
        uv = torch.from_numpy(np.stack([planes[h:h + h // 4].reshape(h // 2, w // 2),
                                        planes[h + h // 4:].reshape(h // 2, w // 2)]))
        u, v = torch.nn.functional.interpolate(uv[None], size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
        y, u, v = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
        rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
        out.append(np.clip(np.round(rgb), 0, 255))
    return np.stack(out)
