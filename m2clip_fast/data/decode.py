"""Frame-accurate sparse video decoding.

Frame ``i`` of a video is the ``i``-th frame in presentation order, i.e. the frame with the
``i``-th smallest presentation timestamp (pts): exactly what decoding the whole video and sorting
the frames by pts gives (the official M²-CLIP loader, and :func:`decode_all_frames` here).

:func:`decode_frames` returns the same pixels while decoding only what the requested indices
need. Per file it first builds a :class:`VideoIndex` by demuxing packets only (no decoding) — the
pts, the seek timestamp and the keyframe flag of every frame — and caches it in a per-process LRU.
Then, walking the requested frames in presentation order, it seeks to the keyframe before the
next needed frame when that keyframe lies ahead of the decoder's position, and keeps decoding
otherwise. Frames are identified by their pts, so B-frame reordering cannot shift them.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import av
import av.video.reformatter
import numpy as np
import torch

from .errors import VideoDecodeError, check_frame_indices as _check_indices, short_text

__all__ = [
    "VideoDecodeError",
    "VideoIndex",
    "DecodeStats",
    "get_index",
    "num_frames",
    "decode_frames",
    "decode_all_frames",
    "clear_index_cache",
    "INDEX_CACHE_SIZE",
]

PathLike = Union[str, os.PathLike]

INDEX_CACHE_SIZE = 2048
# Beyond this many presentation positions past a wanted frame, a frame that has not come out of
# the decoder never will: H.264/HEVC reorder at most 16 frames.
_REORDER_SLACK = 32


@dataclass
class DecodeStats:
    """Counters a caller may pass to the decoding functions; they are incremented in place.

    ``frames_decoded`` counts every frame the codec produced (including those decoded only as
    references on the way to a wanted frame; unwanted non-reference frames are skipped by the
    codec and not counted), ``frames_returned`` the frames handed back,
    ``seeks`` the container seeks, ``seek_retries`` seeks that landed past the wanted keyframe and
    were redone earlier, ``index_builds`` the indexes built (cache misses), ``full_decodes`` the
    calls that had to fall back to decoding the whole video.
    """

    frames_decoded: int = 0
    frames_returned: int = 0
    seeks: int = 0
    seek_retries: int = 0
    index_builds: int = 0
    full_decodes: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


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
    ``ordered``: False when packets carry no usable pts, so frames can only be found by decoding
    the video from its start.
    """

    path: str
    stream_index: int
    codec: str
    width: int
    height: int
    time_base: Fraction
    average_rate: Optional[Fraction]
    pts: np.ndarray
    seek_ts: np.ndarray
    is_key: np.ndarray
    key_before: np.ndarray
    ordered: bool
    first_seek_ts: int
    packet_pts: np.ndarray  # int64 (M,): every packet's pts, in presentation order
    frame_pos: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])


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
    except (VideoDecodeError, _IndexMismatch):
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


def _seek_targets(pts: np.ndarray, demux_ts: np.ndarray, is_key: np.ndarray) -> np.ndarray:
    """The timestamp to seek to for each keyframe (int64 (N,), presentation order).

    Demuxers compare a seek target with different per-packet times: matroska with the pts, avi
    with the dts, mp4 with the dts shifted by the B-frame delay (about the pts). A keyframe's
    pts is at or past every one of these for that keyframe, so seeking to it lands on it unless
    the next keyframe's dts is already <= that pts (keyframes a B-frame delay apart); then its
    own dts is the safer target. A landing one keyframe late is caught and redone by the
    decoder.
    """
    seek = demux_ts.copy()
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


def _build_index(container, stream, path: str) -> VideoIndex:
    pts: List[int] = []
    dts: List[Optional[int]] = []
    keys: List[bool] = []
    discard: List[bool] = []
    try:
        for packet in _checked_packets(container, stream, path):
            if packet.size == 0 and packet.pts is None:
                continue
            pts.append(packet.pts)
            dts.append(packet.dts)
            keys.append(bool(packet.is_keyframe))
            discard.append(bool(packet.is_discard))
    except av.FFmpegError as exc:
        raise VideoDecodeError(path, f"demux failed after {len(pts)} frames ({_reason(exc)})") from exc
    if not pts or all(discard):
        raise VideoDecodeError(path, "zero frames")

    ordered = all(p is not None for p in pts) and len(set(pts)) == len(pts)
    if ordered:
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    else:  # frames are only addressable by decoding from the start
        order = np.arange(len(pts))
    demux_ts = [d if d is not None else p for p, d in zip(pts, dts)]
    known_ts = [t for t in demux_ts if t is not None]
    pts_arr = np.asarray([p if p is not None else i for i, p in enumerate(pts)], dtype=np.int64)[order]
    demux_arr = np.asarray([t if t is not None else 0 for t in demux_ts], dtype=np.int64)[order]
    is_key = np.asarray(keys, dtype=bool)[order]
    seek_ts = _seek_targets(pts_arr, demux_arr, is_key)
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
        pts=pts_arr[frame_pos],
        seek_ts=seek_ts,
        is_key=is_key,
        key_before=key_before,
        ordered=ordered,
        first_seek_ts=min(known_ts) if known_ts else 0,
        packet_pts=pts_arr,
        frame_pos=frame_pos,
    )


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
    with _as_decode_error(path):
        container = _open(path)
        with container:
            index = _index_with(container, path, stats)
    return index


def _index_with(container, path: str, stats: Optional[DecodeStats]) -> VideoIndex:
    index = _cached_index(path)
    if index is None:
        index = _build_index(container, _video_stream(container, path), path)
        _store_index(path, index)
        if stats is not None:
            stats.index_builds += 1
    return index


def num_frames(path: PathLike) -> int:
    """Number of frames of ``path``'s first video stream, from its (cached) index."""
    return get_index(path).num_frames


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


def _full_decode(path: str, threads: Optional[int], stats: Optional[DecodeStats]):
    """Every frame of the video, in presentation order, as PyAV frames (not yet converted).

    Orders by frame pts when every frame has a distinct one (the official loader's rule), by
    decoder output order otherwise.
    """
    container = _open(path)
    decoded = []
    with container:
        stream = _video_stream(container, path)
        _configure_threads(stream, threads)
        try:
            for packet in _checked_packets(container, stream, path):
                decoded.extend(packet.decode())
        except av.FFmpegError as exc:
            raise VideoDecodeError(path, f"decode failed at frame {len(decoded)} ({_reason(exc)})") from exc
    if stats is not None:
        stats.frames_decoded += len(decoded)
        stats.full_decodes += 1
    if not decoded:
        raise VideoDecodeError(path, "zero frames")
    pts = [f.pts for f in decoded]
    if all(p is not None for p in pts) and len(set(pts)) == len(pts):
        decoded = [decoded[i] for i in np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")]
    return decoded


def _select(path: str, decoded: list, indices, stats: Optional[DecodeStats]) -> torch.Tensor:
    """uint8 (len(indices), H, W, 3): the requested frames of a fully decoded video."""
    idx = np.arange(len(decoded)) if indices is None else _check_indices(indices, len(decoded), path)
    # like the official loader, convert only the frames asked for
    rgb = {int(i): _to_rgb(decoded[int(i)]) for i in np.unique(idx)}
    if stats is not None:
        stats.frames_returned += int(idx.size)
    return _stack(path, rgb, idx, decoded[0].height, decoded[0].width)


def decode_all_frames(
    path: PathLike,
    indices: Optional[Sequence[int]] = None,
    *,
    threads: Optional[int] = None,
    stats: Optional[DecodeStats] = None,
) -> torch.Tensor:
    """Decode the whole video (the official M²-CLIP approach) and return frames in pts order.

    Returns uint8 (N, H, W, 3) RGB for all N frames, or (len(indices), H, W, 3) for the requested
    ``indices`` (which, like the official loader, are the only frames converted to RGB). This is
    the baseline the benchmarks compare against and the oracle the tests check
    :func:`decode_frames` with.
    """
    path = os.fspath(path)
    with _as_decode_error(path):
        return _select(path, _full_decode(path, threads, stats), indices, stats)


def _prepend(first, rest: Iterator) -> Iterator:
    # a generator rather than itertools.chain, so that close() reaches the demuxing generator
    yield first
    yield from rest


class _IndexMismatch(Exception):
    """The decoder produced a frame whose pts is not in the index: address frames another way."""


class _SparseDecoder:
    """Seeks and decodes the frames of one open container for one :func:`decode_frames` call."""

    def __init__(self, container, stream, index: VideoIndex, path: str, stats: Optional[DecodeStats]):
        self.container, self.stream, self.index, self.path = container, stream, index, path
        self.stats = stats
        # frames are handled here by packet position (see VideoIndex), mapped back at the end
        self.pts_to_idx = {int(p): i for i, p in enumerate(index.packet_pts)}
        self.wanted_pts: set = set()

    def _frame(self, position: int) -> int:
        """The frame index of a (shown) packet position."""
        return int(np.searchsorted(self.index.frame_pos, position))

    def _count(self, name: str) -> None:
        if self.stats is not None:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _frames_after_seek(self, seek_ts: int) -> Iterator[Tuple[int, object]]:
        """(index, frame) in decoder output order after seeking the demuxer to ``seek_ts``."""
        # seek() also flushes the codec, so no frame from before the jump comes out after it
        self.container.seek(int(seek_ts), stream=self.stream, backward=True, any_frame=False)
        self._count("seeks")
        ctx = self.stream.codec_context
        try:
            for packet in self.container.demux(self.stream):
                # a non-reference frame (most B-frames) that is not wanted can be dropped by the
                # codec unseen: nothing depends on it. A frame's pts is its packet's pts.
                ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in self.wanted_pts else "NONREF"
                for frame in packet.decode():
                    self._count("frames_decoded")
                    idx = self.pts_to_idx.get(frame.pts)
                    if idx is None:
                        raise _IndexMismatch()
                    yield idx, frame
        except av.FFmpegError as exc:
            raise VideoDecodeError(self.path, f"decode failed ({_reason(exc)})") from exc

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
            self._count("seek_retries")
        raise VideoDecodeError(self.path, f"cannot reach frame {self._frame(target)} by seeking")

    def decode(self, wanted_frames: np.ndarray) -> Dict[int, np.ndarray]:
        """RGB arrays (H, W, 3) uint8 for the sorted unique frame indices ``wanted_frames``."""
        wanted = self.index.frame_pos[wanted_frames]  # packet positions, still sorted
        got: Dict[int, np.ndarray] = {}
        wanted_set = set(int(i) for i in wanted)
        self.wanted_pts = {int(self.index.packet_pts[i]) for i in wanted_set}
        frames: Optional[Iterator] = None
        pos = -1  # highest presentation index the decoder has produced since the last seek
        floor = 0  # below this, frames after a seek are open-GOP leading frames: unusable
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
                pos, floor = -1, max(key, 0)
            while j not in got:
                item = next(frames, None)
                if item is None:
                    raise VideoDecodeError(self.path, f"frame {self._frame(j)} missing from the stream")
                idx, frame = item
                if idx < floor:
                    continue
                pos = max(pos, idx)
                if idx in wanted_set and idx not in got:
                    got[idx] = _to_rgb(frame)
                if pos > j + _REORDER_SLACK and j not in got:
                    raise VideoDecodeError(self.path, f"frame {self._frame(j)} missing from the stream")
        if frames is not None:
            frames.close()
        return {int(f): got[int(p)] for f, p in zip(wanted_frames, wanted)}


def decode_frames(
    path: PathLike,
    indices: Sequence[int],
    *,
    threads: Optional[int] = None,
    stats: Optional[DecodeStats] = None,
) -> torch.Tensor:
    """Decode the frames at ``indices`` (presentation order) of ``path``'s first video stream.

    Returns uint8 (len(indices), H, W, 3) RGB, in the order requested; indices may repeat and be
    unsorted. The pixels equal ``decode_all_frames(path)[indices]``, decoded sparsely on the CPU
    (:func:`m2clip_fast.data.frames.decode_frames` picks this or another backend). ``threads``: codec
    threads (None: automatic).
    ``stats``: a :class:`DecodeStats` to accumulate counters into.

    Raises :class:`VideoDecodeError` (missing, unreadable, corrupt, truncated, zero-frame file or
    an index out of range).
    """
    path = os.fspath(path)
    with _as_decode_error(path):
        container = _open(path)
        with container:
            index = _index_with(container, path, stats)
            idx = _check_indices(indices, index.num_frames, path)
            wanted = np.unique(idx)
            if not wanted.size:
                return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
            got = None
            if index.ordered:
                stream = _video_stream(container, path)
                _configure_threads(stream, threads)
                try:
                    got = _SparseDecoder(container, stream, index, path, stats).decode(wanted)
                except _IndexMismatch:
                    got = None  # decoded frames' pts disagree with the packets': decode it all
        if got is None:
            # no usable pts: frames can only be counted off a decode from the start
            return _select(path, _full_decode(path, threads, stats), idx, stats)
        if stats is not None:
            stats.frames_returned += int(idx.size)
        return _stack(path, got, idx, index.height, index.width)


def bilinear_bt601_rgb(path: PathLike) -> np.ndarray:
    """Every frame of ``path`` in presentation order as float64 (N, H, W, 3) RGB, rounded to levels:
    PyAV's YUV 4:2:0 planes converted with BT.601 limited-range coefficients and bilinear chroma.

    The conversion DALI's decoder applies, computed independently of it (our own decode path uses
    swscale, which repeats each chroma sample over its 2×2 block instead); VP9's YUV output is
    bit-exact by the codec spec, so DALI's RGB must equal this within a level of rounding.
    """
    with av.open(os.fspath(path)) as container:
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
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
