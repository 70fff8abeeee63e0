"""DALIClipLoader: training/validation batches decoded and transformed by NVIDIA DALI (optional).

A Python source picks the frame indices and augmentation parameters per sample (seeded by
``(seed, epoch, item, attempt)`` like :class:`~m2clip_fast.data.VideoClipDataset`) and DALI decodes,
resizes, crops, flips and normalises, yielding ``{"video", "label", "index", "skipped"}`` batches. The
pipeline runs on a background thread (:class:`~m2clip_fast.data.prefetch.Prefetcher`), ``prefetch``
batches ahead of the training step, on the GPU that was torch's current device when the loader was built.
Files are checked with their PyAV packet index first (:func:`~m2clip_fast.data.decode.get_index`). A file
that passes that check but still makes DALI's decoder fail inside a batch is found by decoding the batch's
files one at a time, skipped and replaced (:mod:`.robust`); the pipeline is then rebuilt and the batch run
again.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from .dali import (PIPELINES, batch_to_torch, build_pipeline, check_codec, dali_api, dali_error_text,
                   pipeline_device_id, read_bytes, resolve_device)
from .datasets import DatasetError, Sample
from .decode import get_index, num_frames
from .errors import VideoDecodeError
from .prefetch import Prefetcher
from .robust import SAMPLE_ERRORS, fill_failed, replacement_index, skip_reason
from .sampling import check_clip_settings, sample_indices
from .transforms import CLIP_MEAN, CLIP_STD, CROP_FRACTIONS

__all__ = ["DALIClipLoader", "DALIBatchError"]


class DALIBatchError(UserError, RuntimeError):
    """DALI failed on a batch whose files each decode on their own: not a file's fault, nothing to replace."""

# the pipeline's external sources, in the order of _ClipSource's item columns
_INPUTS = ("encoded", "frames", "short", "pos_x", "pos_y", "mirror", "label", "index")


class _ClipSource:
    """What the pipeline is fed, per epoch: the order of the items (shuffled, sharded), and per item the
    encoded file, frame indices, resize and crop parameters, label and index. Bad files are replaced along
    :func:`~m2clip_fast.data.robust.replacement_index`'s chain and logged in ``pending_skipped`` until the
    batch is yielded; ``undecodable`` maps the files DALI failed on (though their index was fine) to why."""

    def __init__(self, samples: Sequence[Sample], *, num_frames: int, size: int, train: bool, sampling: str,
                 stride: int, flip: bool, scale_range: Tuple[float, float], num_clips: int, num_crops: int,
                 device: str, seed: int, max_attempts: int, batch_size: int, shuffle: bool, drop_last: bool,
                 shard_id: int, num_shards: int):
        self.samples = [(os.fspath(p), int(label)) for p, label in samples]
        self.num_frames, self.size, self.train = num_frames, size, train
        self.sampling, self.stride, self.flip, self.scale_range = sampling, stride, flip, tuple(scale_range)
        self.num_clips, self.num_crops, self.device = num_clips, num_crops, device
        self.seed, self.max_attempts = seed, max_attempts
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch = 0
        self.order: List[int] = []
        self.cursor = 0
        self.pending_skipped: List[Dict[str, Any]] = []
        self.undecodable: Dict[str, str] = {}

    def __len__(self) -> int:
        """Batches per epoch of this shard."""
        per_shard = -(-len(self.samples) // self.num_shards)
        return per_shard // self.batch_size if self.drop_last else -(-per_shard // self.batch_size)

    def replacement(self, i: int, k: int) -> int:
        return replacement_index(i, k, len(self.samples))

    def start_epoch(self) -> None:
        n = len(self.samples)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        # contiguous shards padded by wrapping, as DistributedSampler does, so all ranks agree on
        # the number of batches
        per_shard = -(-n // self.num_shards)
        order = np.resize(order, per_shard * self.num_shards)
        self.order = order[self.shard_id * per_shard:(self.shard_id + 1) * per_shard].tolist()
        if self.drop_last:
            self.order = self.order[: len(self.order) // self.batch_size * self.batch_size]
        self.cursor = 0
        self.pending_skipped = []

    def skip(self, path: str, reason: str, j: int) -> None:
        self.pending_skipped.append({"path": path, "reason": reason, "index": j})

    def mark_undecodable(self, j: int, reason: str) -> None:
        """Sample ``j``'s file failed inside DALI: skip it now and whenever it comes up again."""
        path = self.samples[j][0]
        self.undecodable[path] = reason
        self.skip(path, reason, j)

    def attempt(self, i: int, first: int = 0) -> Tuple[int, Optional[Tuple]]:
        """``(k, item)`` for item ``i``: the first usable sample of its replacement chain from
        attempt ``first`` on (files DALI failed to decode before count as unusable); item None when every
        attempt failed (the batch then fills its place, :func:`~.robust.fill_failed`)."""
        n = len(self.samples)
        for k in range(first, min(self.max_attempts, n)):
            j = self.replacement(i, k)
            path, label = self.samples[j]
            rng = np.random.default_rng([self.seed, self.epoch, i, k])
            try:
                if path in self.undecodable:
                    raise VideoDecodeError(path, self.undecodable[path])
                index, count = get_index(path), num_frames(path)  # a full decode's count where packets lack it
                check_codec(path, index.codec, self.device)
                encoded = read_bytes(path)
            except SAMPLE_ERRORS as exc:
                self.skip(path, skip_reason(exc), j)
                continue
            frames = sample_indices(self.sampling, count, self.num_frames, train=self.train,
                                    stride=self.stride, num_clips=self.num_clips, rng=rng).reshape(-1)
            return k, (encoded, frames.astype(np.int32), *self._geometry(index, rng), np.array(label, np.int64),
                       np.array(j, np.int64))
        return self.max_attempts, None

    def _geometry(self, index, rng: np.random.Generator) -> Tuple[np.ndarray, ...]:
        """Resize target (the short side), crop positions x and y (one per crop, as fractions of the slack)
        and the mirror flag, as the pipeline's inputs."""
        if self.train:
            lo, hi = round(self.size * self.scale_range[0]), round(self.size * self.scale_range[1])
            target = float(rng.integers(lo, hi + 1))
            pos_y, pos_x = np.array([rng.random()]), np.array([rng.random()])
            mirror = int(self.flip and rng.random() < 0.5)
        else:
            target, mirror = float(self.size), 0
            along, across = np.array(CROP_FRACTIONS[self.num_crops]), np.full(self.num_crops, 0.5)
            pos_x, pos_y = (along, across) if index.width >= index.height else (across, along)
        return (np.array(target, np.float32), pos_x.astype(np.float32), pos_y.astype(np.float32),
                np.array(mirror, np.int32))

    def _one(self, i: int) -> Tuple:
        return self.attempt(i)[1]

    def next_ids(self) -> Optional[List[int]]:
        """The items of the next batch, None at the end of the epoch."""
        if self.cursor >= len(self.order):
            return None
        ids = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
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
    at :data:`~m2clip_fast.data.transforms.CROP_FRACTIONS` of the slack (the official offsets); ``video``
    is (B, V, T, 3, size, size), V = num_clips · num_crops views ordered clip-major.
    ``shard_id``/``num_shards`` split the data for distributed training. Call
    :meth:`set_epoch` before each epoch.

    Bad videos never stop the run: files that fail the up-front check and files that fail inside
    DALI's batch decoding (found by decoding the failed batch's files one at a time, then
    remembered) are reported in ``skipped`` and replaced along :meth:`replacement`'s chain, so every
    batch keeps its size.

    Batches are produced on a background thread, up to ``prefetch`` (>= 2 keeps the next batch decoding
    while the consumer works on one) ahead; an error there (e.g. a batch whose every video failed) is
    raised by the iteration at that batch. ``device_id``: the GPU of ``device="mixed"`` (default: torch's
    current CUDA device at construction).
    """

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
        device_id: Optional[int] = None,
        prefetch: int = 2,
    ):
        dali_api()
        if not samples:
            raise DatasetError("DALIClipLoader needs at least one sample")
        if train and (num_clips != 1 or num_crops != 1):
            raise ValueError("multi-view (num_clips, num_crops > 1) is for evaluation: pass train=False")
        if num_crops not in CROP_FRACTIONS or num_clips < 1:
            raise ValueError(f"num_crops must be one of {sorted(CROP_FRACTIONS)} and num_clips >= 1, "
                             f"got {num_crops} and {num_clips}")
        check_clip_settings(sampling, num_frames, stride)
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 batch, got {prefetch}")
        self.batch_size, self.num_frames, self.size, self.train = batch_size, num_frames, size, train
        self.num_clips, self.num_crops, self.num_threads = num_clips, num_crops, num_threads
        self.device = resolve_device(device)
        # fixed now: the current device is per thread, and the pipeline runs on another one
        self.device_id = pipeline_device_id(self.device, device_id)
        self.prefetch = prefetch
        self._feeder = lambda: None  # weak reference to the current pass's Prefetcher
        self._source = _ClipSource(
            samples, num_frames=num_frames, size=size, train=train, sampling=sampling, stride=stride, flip=flip,
            scale_range=scale_range, num_clips=num_clips, num_crops=num_crops, device=self.device, seed=seed,
            max_attempts=max_attempts, batch_size=batch_size, shuffle=train if shuffle is None else shuffle,
            drop_last=drop_last, shard_id=shard_id, num_shards=num_shards)
        self._pipe = self._build_pipeline()

    @property
    def samples(self) -> List[Sample]:
        return self._source.samples

    @property
    def undecodable(self) -> Dict[str, str]:
        """path -> reason for files that passed the up-front check but failed inside DALI's decoder."""
        return self._source.undecodable

    def replacement(self, i: int, k: int) -> int:
        """The sample tried at attempt ``k`` (0: ``i`` itself) for item ``i``: the same chain as
        :meth:`~m2clip_fast.data.VideoClipDataset.replacement`."""
        return self._source.replacement(i, k)

    def _build_pipeline(self):
        fn, _, types = dali_api()
        size, num_crops, device = self.size, self.num_crops, self.device

        def clip_pipeline():
            encoded, frames, short, pos_x, pos_y, mirror, label, index = (
                fn.external_source(name=name, dtype=dtype, ndim=ndim) for name, dtype, ndim in zip(
                    _INPUTS, [types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32,
                              types.INT64, types.INT64], [1, 1, 0, 1, 1, 0, 0, 0]))
            video = fn.decoders.video(encoded, frames=frames, device=device)  # (clips·T, H, W, 3)
            video = fn.resize(video, resize_shorter=short, antialias=True, interp_type=types.INTERP_LINEAR)
            # one crop op per view (pos_x / pos_y hold num_crops positions per sample), stacked:
            # (crops, clips·T, 3, size, size)
            views = [fn.crop_mirror_normalize(
                video, crop=(size, size), crop_pos_x=pos_x[k], crop_pos_y=pos_y[k], mirror=mirror,
                mean=(CLIP_MEAN * 255).tolist(), std=(CLIP_STD * 255).tolist(),
                dtype=types.FLOAT, output_layout="FCHW") for k in range(num_crops)]
            return fn.stack(*views), label, index

        return build_pipeline(clip_pipeline, batch_size=self.batch_size, num_threads=self.num_threads,
                              device=device, device_id=self.device_id)

    def _run(self, items: List[Tuple]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        for name, column in zip(_INPUTS, zip(*items)):
            self._pipe.feed_input(name, list(column))
        video, label, index = self._pipe.run()
        out = (batch_to_torch(video, torch.float32), batch_to_torch(label, torch.int64),
               batch_to_torch(index, torch.int64))
        if self.device_id is not None:
            # copied on this thread's stream; finished before the consumer (any stream) gets the batch
            torch.cuda.current_stream(self.device_id).synchronize()
        return out

    def _find_undecodable(self, items: List[Tuple]) -> List[Tuple[int, str]]:
        """``(position, reason)`` of the batch's samples that DALI cannot decode on their own."""
        bad = []
        for pos, item in enumerate(items):
            path = self.samples[int(item[-1])][0]
            try:
                PIPELINES.run(self.device, item[0], item[1], path, self.device_id)
            except VideoDecodeError as exc:
                bad.append((pos, exc.reason))
        return bad

    def _decode_batch(self, ids: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode and transform the items ``ids``; a sample whose file makes DALI fail is recorded
        as skipped and replaced by the next sample of its chain, so the batch stays full."""
        source = self._source
        attempts = [source.attempt(i) for i in ids]
        while True:
            items = fill_failed([item for _, item in attempts],
                                [f"{s['path']}: {s['reason']}" for s in source.pending_skipped])
            try:
                return self._run(items)
            except Exception as exc:  # noqa: BLE001 - DALI raises several types on a bad file
                # a failed DALI pipeline stays unusable: the next run builds a fresh one
                self._pipe = None
                bad = self._find_undecodable(items)
                if not bad:  # not a file's fault: nothing to replace
                    paths = [self.samples[int(item[-1])][0] for item in items]
                    raise DALIBatchError(f"DALI failed on a batch of {len(paths)} videos ({paths[0]}"
                                         f"{', ...' if len(paths) > 1 else ''}) that each decode alone: "
                                         f"{dali_error_text(exc)}") from exc
                for pos, reason in bad:
                    source.mark_undecodable(int(items[pos][-1]), reason)
                for pos, _ in bad:  # a filled-in position's own item had failed already: it stays failed
                    if attempts[pos][1] is not None:
                        attempts[pos] = source.attempt(ids[pos], attempts[pos][0] + 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the next iteration's shuffle and augmentation."""
        self._source.epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._source.epoch

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """This epoch's batches, produced ``prefetch`` ahead on a background thread."""
        earlier = self._feeder()
        if earlier is not None:  # an earlier pass left unfinished: its thread shares the source and pipeline
            earlier.close()
        self._source.start_epoch()
        setup = None if self.device_id is None else (lambda: torch.cuda.set_device(self.device_id))
        feeder = Prefetcher(self._batches(), self.prefetch, setup=setup, name="dali-feeder")
        self._feeder = weakref.ref(feeder)
        return _closing(feeder)

    def _batches(self) -> Iterator[Dict[str, Any]]:
        source = self._source
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


def _closing(feeder: Prefetcher) -> Iterator[Dict[str, Any]]:
    """``feeder``'s items; leaving the loop early (or dropping the iterator) stops its thread."""
    try:
        yield from feeder
    finally:
        feeder.close()
