"""NVIDIA DALI backend (optional: ``pip install nvidia-dali-cuda120``).

Two entry points:

* :func:`decode_frames_dali` — the ``backend="dali"`` of :func:`~m2clip_fast.data.decode_frames`:
  a DALI pipeline (``fn.decoders.video`` with per-sample ``frames``) decodes the requested frames
  of one file. With CUDA it decodes on the GPU (``device="mixed"``, NVDEC: H.264, HEVC, VP8, VP9,
  AV1, MPEG-4); on the CPU DALI 2.x decodes only VP8, VP9 and MJPEG.
* :class:`DALIClipLoader` — a training/validation iterator: a Python source picks the frame
  indices and augmentation parameters per sample (seeded by ``(seed, epoch, index)`` like
  :class:`~m2clip_fast.data.VideoClipDataset`) and DALI decodes, resizes, crops, flips and
  normalises, yielding ``{"video", "label", "index", "skipped"}`` batches through
  ``DALIGenericIterator``.

Files are validated with the PyAV packet index first (cheap: demux only), so broken files raise
:class:`~m2clip_fast.data.VideoDecodeError` with a clear reason instead of invalidating the DALI
pipeline, and so that frame ``i`` means the same frame as with the PyAV backend.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import DatasetError, Sample
from .decode import VideoDecodeError, get_index
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
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                raise VideoDecodeError(path, f"DALI decode failed ({lines[-1][:160]})") from exc


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
    index = get_index(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= index.num_frames):
        bad = idx[(idx < 0) | (idx >= index.num_frames)]
        raise VideoDecodeError(path, f"frame index {int(bad[0])} out of range for {index.num_frames} frames")
    _check_codec(path, index.codec, device)
    if idx.size == 0:
        return torch.empty((0, index.height, index.width, 3), dtype=torch.uint8)
    return _PIPELINES.run(device, _read_bytes(path), idx.astype(np.int32), path)


# --------------------------------------------------------------------------------------------
# training / validation loader


class _ClipSource:
    """DALI external source (batch mode): per sample the encoded file, frame indices, resize and
    crop parameters, label and index. Bad files are replaced like in VideoClipDataset and logged
    in ``pending_skipped``."""

    def __init__(self, loader: "DALIClipLoader"):
        self.loader = loader
        self.order: Optional[List[int]] = None
        self.cursor = 0
        self.pending_skipped: List[Dict[str, Any]] = []
        # one list per produced batch, consumed in order by the iterator: DALI runs the source
        # ahead of the consumer, so a single shared list would mix up batches
        self.batch_skipped: "collections.deque[List[Dict[str, Any]]]" = collections.deque()

    def __iter__(self):
        # DALI calls iter() as soon as the previous epoch ends, before the caller's set_epoch();
        # the epoch's order is therefore fixed lazily, by the first batch request
        self.order = None
        return self

    def _start_epoch(self) -> None:
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
        self.batch_skipped.clear()

    def _one(self, i: int) -> Tuple:
        ld = self.loader
        n = len(ld.samples)
        for k in range(min(ld.max_attempts, n)):
            j = ld.replacement(i, k)
            path, label = ld.samples[j]
            rng = np.random.default_rng([ld.seed, ld.epoch, i, k])
            try:
                index = get_index(path)
                _check_codec(path, index.codec, ld.device)
                frames = sample_indices(ld.sampling, index.num_frames, ld.num_frames, train=ld.train,
                                        stride=ld.stride, num_clips=ld.num_clips, rng=rng).reshape(-1)
                encoded = _read_bytes(path)
            except Exception as exc:  # noqa: BLE001 - whatever an odd file triggers, never stop the run
                self.pending_skipped.append({"path": path, "reason": skip_reason(exc), "index": j})
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
            return (encoded, frames.astype(np.int32), np.float32(target), pos_x.astype(np.float32),
                    pos_y.astype(np.float32), np.int32(mirror), np.int64(label), np.int64(j))
        raise DatasetError(f"item {i}: all attempted videos failed "
                           f"({'; '.join(s['path'] + ': ' + s['reason'] for s in self.pending_skipped[-5:])})")

    def __next__(self):
        if self.order is None:
            self._start_epoch()
        if self.cursor >= len(self.order):
            raise StopIteration
        items = [self._one(i) for i in self.order[self.cursor:self.cursor + self.loader.batch_size]]
        self.cursor += self.loader.batch_size
        self.batch_skipped.append(self.pending_skipped)
        self.pending_skipped = []
        return [list(column) for column in zip(*items)]


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
        fn, pipeline_def, types = _dali()
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
        self.epoch = 0
        self._source = _ClipSource(self)
        gpu = self.device == "mixed"

        @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                      device_id=torch.cuda.current_device() if gpu else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def clip_pipeline():
            encoded, frames, short, pos_x, pos_y, mirror, label, index = fn.external_source(
                source=self._source, num_outputs=8, batch=True, cycle="raise",
                dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32,
                       types.INT64, types.INT64])
            video = fn.decoders.video(encoded, frames=frames, device=self.device)  # (clips·T, H, W, 3)
            video = fn.resize(video, resize_shorter=short, antialias=True, interp_type=types.INTERP_LINEAR)
            # one crop op per view (pos_x / pos_y hold num_crops positions per sample), stacked:
            # (crops, clips·T, 3, size, size)
            views = [fn.crop_mirror_normalize(
                video, crop=(size, size), crop_pos_x=pos_x[k], crop_pos_y=pos_y[k], mirror=mirror,
                mean=(CLIP_MEAN * 255).tolist(), std=(CLIP_STD * 255).tolist(),
                dtype=types.FLOAT, output_layout="FCHW") for k in range(num_crops)]
            return fn.stack(*views), label, index

        self._pipe = clip_pipeline()
        self._pipe.build()
        self._iterator = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the next iteration's shuffle and augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_shard = -(-len(self.samples) // self.num_shards)
        return per_shard // self.batch_size if self.drop_last else -(-per_shard // self.batch_size)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        # no auto-reset and no first batch prepared ahead: the source must start each epoch only
        # when iteration starts, after set_epoch(), or the epoch's seeds would be stale
        if self._iterator is None:
            self._iterator = DALIGenericIterator(self._pipe, ["video", "label", "index"],
                                                 auto_reset=False, prepare_first_batch=False)
        else:
            self._iterator.reset()
        for (batch,) in self._iterator:
            skipped = self._source.batch_skipped.popleft()
            video = batch["video"]  # (B, crops, clips·T, 3, S, S)
            b, crops, _, *chw = video.shape
            video = video.view(b, crops, self.num_clips, self.num_frames, *chw).transpose(1, 2)
            video = video[:, 0, 0] if self.train else video.reshape(b, self.num_clips * crops, self.num_frames, *chw)
            yield {
                "video": video,
                "label": batch["label"].reshape(-1).long(),
                "index": batch["index"].reshape(-1).long(),
                "skipped": skipped,
            }
