"""NVIDIA DALI backend (optional: ``pip install nvidia-dali-cuda120``).

Two entry points:

* :func:`decode_frames_dali` — the ``backend="dali"`` of :func:`~m2clip_fast.data.decode_frames`:
  a DALI pipeline (``fn.decoders.video`` with per-sample ``frames``) decodes the requested frames
  of one file. With CUDA it decodes on the GPU (``device="mixed"``, NVDEC: H.264, HEVC, VP8, VP9,
  AV1, MPEG-4); on the CPU DALI 2.x decodes only VP8, VP9 and MJPEG.
* :class:`DALIClipLoader` — a training/validation iterator: a Python source picks the frame
  indices and augmentation parameters per sample (seeded by ``(seed, epoch, index)`` like
  :class:`~m2clip_fast.data.VideoClipDataset`) and DALI decodes, resizes, crops, flips and
  normalises, yielding ``{"video", "label", "index", "skipped"}`` batches.

Files are validated with the PyAV packet index first (cheap: demux only), so broken files raise
:class:`~m2clip_fast.data.VideoDecodeError` with a clear reason instead of invalidating the DALI
pipeline, and so that frame ``i`` means the same frame as with the PyAV backend. A file that
passes that check but still makes DALI's decoder fail inside a loader batch is found by decoding
the batch's files one at a time, skipped and replaced; the pipeline is then rebuilt and the batch
run again.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import DatasetError, Sample
from .decode import VideoDecodeError, get_index, num_frames
from .loader import replacement_index, skip_reason
from .sampling import SAMPLINGS, sample_indices
from .transforms import CLIP_MEAN, CLIP_STD

__all__ = [
    "DALIUnavailableError",
    "dali_available",
    "require_dali",
    "cpu_codecs",
    "decode_frames_dali",
    "DALIClipLoader",
]

# Test-crop positions along the long side as fractions of its slack (long − size); the same
# offsets as m2clip_fast.data.transforms.crop_offsets, there rounded down to whole pixels.
CROP_FRACTIONS = {1: (0.5,), 3: (0.0, 0.5, 1.0), 4: (0.0, 0.25, 0.5, 1.0)}

# Codecs DALI 2.x's CPU video decoder handles; everything else needs the mixed (NVDEC) backend.
_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
_INSTALL_HINT = "pip install nvidia-dali-cuda120 (the m2clip-fast[dali] extra)"


class DALIUnavailableError(ImportError):
    """NVIDIA DALI is not installed or cannot be imported."""


def _dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise DALIUnavailableError(f"backend 'dali' needs NVIDIA DALI, which is not importable "
                                   f"({exc}); {_INSTALL_HINT}") from exc
    return fn, pipeline_def, types


def require_dali() -> None:
    """Raise DALIUnavailableError (with the install hint) unless NVIDIA DALI can be imported."""
    _dali()


def dali_available() -> bool:
    """True when NVIDIA DALI can be imported."""
    try:
        _dali()
    except DALIUnavailableError:
        return False
    return True


def cpu_codecs() -> frozenset:
    """Codec names (FFmpeg's) that DALI can decode without a GPU."""
    return _CPU_CODECS


def _resolve_device(device: Optional[str]) -> str:
    if device is None:
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise ValueError(f"DALI device must be 'cpu' or 'mixed' (GPU), got {device!r}")
    if device == "mixed" and not torch.cuda.is_available():
        raise RuntimeError("DALI device 'mixed' decodes on the GPU, but CUDA is not available")
    return device


def _check_codec(path: str, codec: str, device: str) -> None:
    supported = _CPU_CODECS if device == "cpu" else _GPU_CODECS
    if codec not in supported:
        where = ("DALI's CPU decoder (VP8/VP9/MJPEG only); decode on a GPU or use backend='pyav'"
                 if device == "cpu" else "DALI's GPU decoder")
        raise VideoDecodeError(path, f"codec {codec} is not supported by {where}")


def _read_bytes(path: str) -> np.ndarray:
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
        return lines[lines.index("encountered:") + 1][:160]
    lines = [line for line in lines if not line.startswith(("Current pipeline object", "Critical error"))]
    return lines[-1][:160] if lines else type(exc).__name__


def _batch_to_torch(batch, dtype: torch.dtype) -> torch.Tensor:
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
        fn, pipeline_def, types = _dali()

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


_PIPELINES = _FramePipelines()


def decode_frames_dali(path: str, indices: Sequence[int], *, device: Optional[str] = None) -> torch.Tensor:
    """Decode ``indices`` of ``path`` with DALI: uint8 (len(indices), H, W, 3) RGB.

    ``device``: ``"mixed"`` (GPU decoding; the result is a CUDA tensor), ``"cpu"`` (VP8/VP9/MJPEG
    only) or None (GPU when CUDA is available). Indices may repeat and be unsorted. Raises
    :class:`DALIUnavailableError` without DALI and :class:`VideoDecodeError` for unusable files,
    indices out of range and codecs the chosen device cannot decode.
    """
    _dali()
    path = os.fspath(path)
    device = _resolve_device(device)
    index, count = get_index(path), num_frames(path)  # the count of a full decode, where the index lacks it
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= count):
        bad = idx[(idx < 0) | (idx >= count)]
        raise VideoDecodeError(path, f"frame index {int(bad[0])} out of range for {count} frames")
    _check_codec(path, index.codec, device)
    if idx.size == 0:
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    return _PIPELINES.run(device, _read_bytes(path), idx.astype(np.int32), path)


# --------------------------------------------------------------------------------------------
# training / validation loader


# the pipeline's external sources, in the order of _ClipSource's item columns
_INPUTS = ("encoded", "frames", "short", "pos_x", "pos_y", "mirror", "label", "index")


class _ClipSource:
    """Per sample the encoded file, frame indices, resize and crop parameters, label and index,
    fed to the pipeline batch by batch. Bad files are replaced like in VideoClipDataset and logged
    in ``pending_skipped`` until the batch is yielded."""

    def __init__(self, loader: "DALIClipLoader"):
        self.loader = loader
        self.order: List[int] = []
        self.cursor = 0
        self.pending_skipped: List[Dict[str, Any]] = []

    def start_epoch(self) -> None:
        ld = self.loader
        n = len(ld.samples)
        order = np.random.default_rng([ld.seed, ld.epoch]).permutation(n) if ld.shuffle else np.arange(n)
        # contiguous shards padded by wrapping, as DistributedSampler does, so all ranks agree on
        # the number of batches
        per_shard = -(-n // ld.num_shards)
        order = np.resize(order, per_shard * ld.num_shards)
        self.order = order[ld.shard_id * per_shard:(ld.shard_id + 1) * per_shard].tolist()
        if ld.drop_last:
            self.order = self.order[: len(self.order) // ld.batch_size * ld.batch_size]
        self.cursor = 0
        self.pending_skipped = []

    def skip(self, path: str, reason: str, j: int) -> None:
        self.pending_skipped.append({"path": path, "reason": reason, "index": j})

    def attempt(self, i: int, first: int = 0) -> Tuple[int, Tuple]:
        """``(k, item)`` for item ``i``: the first usable sample of its replacement chain from
        attempt ``first`` on (files DALI failed to decode before count as unusable)."""
        ld = self.loader
        n = len(ld.samples)
        for k in range(first, min(ld.max_attempts, n)):
            j = ld.replacement(i, k)
            path, label = ld.samples[j]
            rng = np.random.default_rng([ld.seed, ld.epoch, i, k])
            try:
                if path in ld.undecodable:
                    raise VideoDecodeError(path, ld.undecodable[path])
                index = get_index(path)
                _check_codec(path, index.codec, ld.device)
                frames = sample_indices(ld.sampling, num_frames(path), ld.num_frames, train=ld.train,
                                        stride=ld.stride, num_clips=ld.num_clips, rng=rng).reshape(-1)
                encoded = _read_bytes(path)
            except Exception as exc:  # noqa: BLE001 - whatever an odd file triggers, never stop the run
                self.skip(path, skip_reason(exc), j)
                continue
            if ld.train:
                lo, hi = round(ld.size * ld.scale_range[0]), round(ld.size * ld.scale_range[1])
                target = float(rng.integers(lo, hi + 1))
                pos_y, pos_x = np.array([rng.random()]), np.array([rng.random()])
                mirror = int(ld.flip and rng.random() < 0.5)
            else:
                target, mirror = float(ld.size), 0
                along, across = np.array(CROP_FRACTIONS[ld.num_crops]), np.full(ld.num_crops, 0.5)
                pos_x, pos_y = (along, across) if index.width >= index.height else (across, along)
            return k, (encoded, frames.astype(np.int32), np.array(target, np.float32), pos_x.astype(np.float32),
                       pos_y.astype(np.float32), np.array(mirror, np.int32), np.array(label, np.int64),
                       np.array(j, np.int64))
        raise DatasetError(f"item {i}: all attempted videos failed "
                           f"({'; '.join(s['path'] + ': ' + s['reason'] for s in self.pending_skipped[-5:])})")

    def _one(self, i: int) -> Tuple:
        return self.attempt(i)[1]

    def next_ids(self) -> Optional[List[int]]:
        """The items of the next batch, None at the end of the epoch."""
        if self.cursor >= len(self.order):
            return None
        ids = self.order[self.cursor:self.cursor + self.loader.batch_size]
        self.cursor += self.loader.batch_size
        return ids


class DALIClipLoader:
    """Batches of augmented clips decoded and transformed by DALI.

    Iterating yields dicts: ``video`` float32 (B, T, 3, size, size) CLIP-normalised (on the GPU
    with ``device="mixed"``), ``label``/``index`` int64 (B,), ``skipped``: list of
    ``{"path", "reason", "index"}`` for the bad videos replaced while producing the batch.

    Training (``train=True``): short-side jitter in ``scale_range``, a random crop and, when
    ``flip``, a random horizontal flip — the same recipe as :func:`~m2clip_fast.data.train_transform`
    but run by DALI; ``video`` is (B, T, 3, size, size). Validation (``train=False``): like
    :class:`~m2clip_fast.data.VideoClipDataset`, ``num_clips`` temporal clips (decoded in one call)
    × ``num_crops`` (1, 3 or 4) crops along the long side after resizing the short side to ``size``,
    at fractions 0, ¼, ½, 1 (4) or 0, ½, 1 (3) of the slack (the official offsets); ``video`` is
    (B, V, T, 3, size, size), V = num_clips · num_crops views ordered clip-major.
    ``shard_id``/``num_shards`` split the data for distributed training. Call
    :meth:`set_epoch` before each epoch.

    Bad videos never stop the run: files that fail the up-front check and files that fail inside
    DALI's batch decoding (found by decoding the failed batch's files one at a time, then
    remembered in ``undecodable``) are reported in ``skipped`` and replaced along
    :meth:`replacement`'s chain, so every batch keeps its size.
    """

    def replacement(self, i: int, k: int) -> int:
        """The sample tried at attempt ``k`` (0: ``i`` itself) for item ``i``: the same chain as
        :meth:`~m2clip_fast.data.VideoClipDataset.replacement`."""
        return replacement_index(i, k, len(self.samples))

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        batch_size: int,
        num_frames: int,
        size: int,
        train: bool,
        sampling: str = "dense",
        stride: int = 8,
        flip: bool = True,
        shuffle: Optional[bool] = None,
        drop_last: bool = False,
        seed: int = 0,
        scale_range: Tuple[float, float] = (1.0, 1.15),
        device: Optional[str] = None,
        num_threads: int = 2,
        shard_id: int = 0,
        num_shards: int = 1,
        max_attempts: int = 10,
        num_clips: int = 1,
        num_crops: int = 1,
    ):
        _dali()
        if not samples:
            raise DatasetError("DALIClipLoader needs at least one sample")
        if train and (num_clips != 1 or num_crops != 1):
            raise ValueError("multi-view (num_clips, num_crops > 1) is for evaluation: pass train=False")
        if num_crops not in CROP_FRACTIONS or num_clips < 1:
            raise ValueError(f"num_crops must be one of {sorted(CROP_FRACTIONS)} and num_clips >= 1, "
                             f"got {num_crops} and {num_clips}")
        self.num_clips, self.num_crops = num_clips, num_crops
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        self.samples = [(os.fspath(p), int(label)) for p, label in samples]
        self.batch_size, self.num_frames, self.size, self.train = batch_size, num_frames, size, train
        self.sampling, self.stride, self.flip = sampling, stride, flip
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last, self.seed, self.scale_range = drop_last, seed, tuple(scale_range)
        self.device = _resolve_device(device)
        self.shard_id, self.num_shards, self.max_attempts = shard_id, num_shards, max_attempts
        self.num_threads = num_threads
        self.epoch = 0
        self._source = _ClipSource(self)
        # path -> reason for files that passed the up-front check but failed inside DALI's decoder
        self.undecodable: Dict[str, str] = {}
        self._pipe = self._build_pipeline()

    def _build_pipeline(self):
        fn, pipeline_def, types = _dali()
        gpu = self.device == "mixed"
        size, num_crops = self.size, self.num_crops

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=torch.cuda.current_device() if gpu else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def clip_pipeline():
            encoded, frames, short, pos_x, pos_y, mirror, label, index = (
                fn.external_source(name=name, dtype=dtype, ndim=ndim) for name, dtype, ndim in zip(
                    _INPUTS, [types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32,
                              types.INT64, types.INT64], [1, 1, 0, 1, 1, 0, 0, 0]))
            video = fn.decoders.video(encoded, frames=frames, device=self.device)  # (clips·T, H, W, 3)
            video = fn.resize(video, resize_shorter=short, antialias=True, interp_type=types.INTERP_LINEAR)
            # one crop op per view (pos_x / pos_y hold num_crops positions per sample), stacked:
            # (crops, clips·T, 3, size, size)
            views = [fn.crop_mirror_normalize(
                video, crop=(size, size), crop_pos_x=pos_x[k], crop_pos_y=pos_y[k], mirror=mirror,
                mean=(CLIP_MEAN * 255).tolist(), std=(CLIP_STD * 255).tolist(),
                dtype=types.FLOAT, output_layout="FCHW") for k in range(num_crops)]
            return fn.stack(*views), label, index

        pipe = clip_pipeline()
        pipe.build()
        return pipe

    def _run(self, items: List[Tuple]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        for name, column in zip(_INPUTS, zip(*items)):
            self._pipe.feed_input(name, list(column))
        video, label, index = self._pipe.run()
        return (_batch_to_torch(video, torch.float32), _batch_to_torch(label, torch.int64),
                _batch_to_torch(index, torch.int64))

    def _find_undecodable(self, items: List[Tuple]) -> List[Tuple[int, str]]:
        """``(position, reason)`` of the batch's samples that DALI cannot decode on their own."""
        bad = []
        for pos, item in enumerate(items):
            path = self.samples[int(item[-1])][0]
            try:
                _PIPELINES.run(self.device, item[0], item[1], path)
            except VideoDecodeError as exc:
                bad.append((pos, exc.reason))
        return bad

    def _decode_batch(self, ids: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode and transform the items ``ids``; a sample whose file makes DALI fail is recorded
        as skipped and replaced by the next sample of its chain, so the batch stays full."""
        attempts = [self._source.attempt(i) for i in ids]
        while True:
            items = [item for _, item in attempts]
            try:
                return self._run(items)
            except Exception as exc:  # noqa: BLE001 - DALI raises several types on a bad file
                # a failed DALI pipeline stays unusable: the next run builds a fresh one
                self._pipe = None
                bad = self._find_undecodable(items)
                if not bad:  # not a file's fault: nothing to replace
                    raise
                for pos, reason in bad:
                    j = int(items[pos][-1])
                    path = self.samples[j][0]
                    self.undecodable[path] = reason
                    self._source.skip(path, reason, j)
                for pos, _ in bad:
                    attempts[pos] = self._source.attempt(ids[pos], attempts[pos][0] + 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the next iteration's shuffle and augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_shard = -(-len(self.samples) // self.num_shards)
        return per_shard // self.batch_size if self.drop_last else -(-per_shard // self.batch_size)

    def __iter__(self):
        source = self._source
        source.start_epoch()
        while True:
            ids = source.next_ids()
            if ids is None:
                return
            video, label, index = self._decode_batch(ids)
            skipped, source.pending_skipped = source.pending_skipped, []
            b, crops, _, *chw = video.shape  # (B, crops, clips·T, 3, S, S)
            video = video.view(b, crops, self.num_clips, self.num_frames, *chw).transpose(1, 2)
            video = video[:, 0, 0] if self.train else video.reshape(b, self.num_clips * crops, self.num_frames, *chw)
            yield {
                "video": video,
                "label": label.reshape(-1),
                "index": index.reshape(-1),
                "skipped": skipped,
            }
