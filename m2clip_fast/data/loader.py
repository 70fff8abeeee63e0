"""The training/evaluation dataset and DataLoader: video files -> normalised clip tensors.

:class:`VideoClipDataset` samples frame indices, decodes only those frames and transforms them.
A bad video (missing, unreadable, corrupt, truncated, zero frames, or too large to hold) never stops
a run: it is replaced by another sample chosen deterministically (:mod:`.robust`), and reported in the
item's ``skipped`` list so the training loop can count it and log it (e.g. to ``skipped.jsonl``). An item
whose replacements all fail too is filled in by :func:`collate` with a readable item of its batch.

All randomness of item ``i`` comes from a generator seeded with ``(seed, epoch, i)``, so results
do not depend on the number of workers or on the order in which workers fetch items.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ..errors import UsageError
from .dali import DALIStartError, dali_available, require_dali
from .dali_loader import DALIClipLoader
from .torchcodec_backend import require_torchcodec
from .datasets import DatasetError, Sample
from .decode import DecodeStats, num_frames as video_num_frames
from .frames import BACKENDS, dali_gpu_problem, decode_frames, decode_sampled
from .robust import SAMPLE_ERRORS, fill_failed, replacement_index, skip_reason
from .sampling import check_clip_settings, sample_indices
from .randaugment import check_rand_augment
from .transforms import check_scale_range, train_transform, views_from_clips

__all__ = ["VideoClipDataset", "collate", "build_loader", "ClipLoader", "DecodeTally", "decode_stats_line",
           "build_clip_loader", "batches_from", "parse_views", "DecoderChoice", "resolve_decoder"]

class VideoClipDataset(Dataset):
    """Clips of ``num_frames`` frames from ``samples`` (a list of ``(path, label)``).

    ``__getitem__(i)`` returns a dict:

    * ``video``: float32 (T, 3, size, size) when ``train``, else (V, T, 3, size, size) with
      ``V = num_clips * num_crops`` views ordered clip-major; CLIP-normalised;
    * ``label``: int; ``index``: int, the sample actually returned (``i`` unless replaced);
    * ``skipped``: list of ``{"path", "reason", "index"}`` for every bad video met on the way;
    * ``decoded``: ``{"path", "fallback"}``: the file decoded and whether it was decoded through from
      the start, sparse seeking not (yet) shown exact for it in this worker (see :class:`DecodeTally`).

    An item whose ``max_attempts`` samples all fail has ``video`` None (and ``label``, ``index`` -1):
    :func:`collate` puts a readable item of the batch in its place.

    ``sampling``: ``"dense"`` (``num_frames`` frames ``stride`` apart) or ``"uniform"`` (TSN
    segments). ``resize`` and ``scale_range``: the training resize (:data:`~.transforms.RESIZE_MODES`; jitter
    scales relative to ``size``, random-resized-crop ones to the frame's area). ``rand_augment``: a timm
    RandAugment string applied with one draw per clip, or None. ``flip``:
    random horizontal flips in training (turn off for Something-Something). ``decoder``:
    a :data:`~m2clip_fast.data.frames.BACKENDS` name; "dali" decodes on the GPU when CUDA is available, and
    ``video`` is then a CUDA tensor (load such a dataset in the main process: ``workers=0``).
    ``max_attempts``: how many samples to try before giving up.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        num_frames: int,
        sampling: str = "dense",
        stride: int = 8,
        train: bool,
        size: int,
        num_clips: int = 1,
        num_crops: int = 1,
        flip: bool = True,
        decoder: str = "pyav",
        seed: int = 0,
        scale_range: Tuple[float, float] = (1.0, 1.15),
        resize: str = "short_side_jitter",
        rand_augment: Optional[str] = None,
        max_attempts: int = 10,
    ):
        if not samples:
            raise DatasetError("VideoClipDataset needs at least one sample")
        check_clip_settings(sampling, num_frames, stride)
        if train and (num_clips != 1 or num_crops != 1):
            raise ValueError("training uses one clip and one crop per video")
        if num_crops not in (1, 3, 4):
            raise ValueError(f"num_crops must be 1, 3 or 4, got {num_crops}")
        if decoder not in BACKENDS:
            raise UsageError(f"decoder must be one of {BACKENDS}, got {decoder!r}")
        if max_attempts < 1:
            raise UsageError(f"max_attempts must be >= 1, got {max_attempts}")
        problem = check_scale_range(resize, scale_range)
        if problem:
            raise UsageError(f"resize {resize!r} with scale_range {scale_range!r}: expected {problem}")
        if rand_augment:
            check_rand_augment(rand_augment)
        self.samples = [(str(p), int(label)) for p, label in samples]
        self.num_frames, self.sampling, self.stride = num_frames, sampling, stride
        self.train, self.size = train, size
        self.num_clips, self.num_crops, self.flip = num_clips, num_crops, flip
        self.decoder, self.seed, self.scale_range = decoder, seed, tuple(scale_range)
        self.resize, self.rand_augment = resize, rand_augment
        self.max_attempts = max_attempts
        # Shared memory, so that set_epoch() in the main process reaches persistent workers,
        # which hold their own copy of the dataset object.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/offsets the next items use."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def replacement(self, i: int, k: int) -> int:
        """The sample tried at attempt ``k`` (0: ``i`` itself) for item ``i``."""
        return replacement_index(i, k, len(self.samples))

    def _clip(self, path: str, rng: np.random.Generator) -> Tuple[torch.Tensor, bool]:
        """The transformed clip of ``path`` and whether its decode needed the fallback."""
        clips = 1 if self.train else self.num_clips
        frames, fallback = self._frames(path, rng, clips)
        if self.train:
            return train_transform(frames, size=self.size, rng=rng, scale_range=self.scale_range, flip=self.flip,
                                   resize=self.resize, rand_augment=self.rand_augment), fallback
        clips = frames.view(clips, self.num_frames, *frames.shape[1:])
        return views_from_clips(list(clips), size=self.size, num_crops=self.num_crops), fallback

    def _frames(self, path: str, rng: np.random.Generator, clips: int) -> Tuple[torch.Tensor, bool]:
        """uint8 (clips * T, H, W, 3) sampled frames of ``path``, and whether they were decoded through."""
        state = rng.bit_generator.state

        def choose(n: int) -> np.ndarray:  # (clips * T,); the same draw however often it is asked
            rng.bit_generator.state = state
            return sample_indices(self.sampling, n, self.num_frames, train=self.train, stride=self.stride,
                                  num_clips=clips, rng=rng).reshape(-1)

        if self.decoder == "dali":
            return decode_frames(path, choose(video_num_frames(path)), backend="dali"), False
        stats = DecodeStats()
        _, frames = decode_sampled(path, choose, backend=self.decoder, stats=stats)
        return frames, stats.fallbacks > 0

    def __getitem__(self, i: int) -> Dict[str, Any]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        skipped: List[Dict[str, Any]] = []
        epoch = self.epoch
        for k in range(min(self.max_attempts, n)):
            j = self.replacement(i, k)
            path, label = self.samples[j]
            # seeded by the requested item and the attempt, not by worker or fetch order
            rng = np.random.default_rng([self.seed, epoch, i, k])
            try:
                video, fallback = self._clip(path, rng)
            except SAMPLE_ERRORS as exc:  # the file's fault (see robust): replaced, never a stopped run
                skipped.append({"path": path, "reason": skip_reason(exc), "index": j})
                continue
            return {"video": video, "label": label, "index": j, "skipped": skipped,
                    "decoded": {"path": path, "fallback": fallback}}
        return {"video": None, "label": -1, "index": -1, "skipped": skipped, "decoded": None}


def collate(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack items: ``video`` float32 (B, ...), ``label``/``index`` int64 (B,), ``skipped``: the
    concatenation of the items' ``skipped`` lists, ``decoded``: the list of the items' ``decoded`` (of the
    items that decoded). Failed items (``video`` None) become copies of readable ones
    (:func:`~.robust.fill_failed`)."""
    skipped = [s for item in batch for s in item["skipped"]]
    items = fill_failed([item if item["video"] is not None else None for item in batch],
                        [f"{s['path']}: {s['reason']}" for s in skipped])
    return {
        "video": torch.stack([item["video"] for item in items]),
        "label": torch.tensor([item["label"] for item in items], dtype=torch.int64),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
        "skipped": skipped,
        "decoded": [item["decoded"] for item in batch if item["decoded"] is not None],
    }


class DecodeTally:
    """How the clips of a pass over a loader were decoded, for a run's ``decode_stats``.

    DataLoader workers keep their own decoding counters (:func:`~m2clip_fast.data.decode.process_stats`
    of another process), so each batch carries its clips' ``decoded`` entries back, and this adds them
    up. Batches without them (the DALI loader, which has no decode-through fallback) count as clips
    only. Feed it with :meth:`add` per batch, or iterate :meth:`watch` (loader) instead of the loader.
    """

    EXAMPLES = 5  # fallback files named in a record

    def __init__(self, decoder: str = ""):
        self.decoder = decoder  # the run's DecoderChoice.description, recorded with the counts when given
        self.clips = 0
        self.fallbacks = 0
        self.files: Set[str] = set()

    def add(self, batch: Dict[str, Any]) -> None:
        self.clips += len(batch["label"])
        for entry in batch.get("decoded", ()):
            if entry["fallback"]:
                self.fallbacks += 1
                self.files.add(entry["path"])

    def watch(self, loader) -> "_Watched":
        """An iterable over ``loader``'s batches (with its ``len``) that tallies each batch it yields."""
        return _Watched(loader, self)

    def record(self, gather: Callable[[Any], List[Any]] = lambda part: [part]) -> Dict[str, Any]:
        """``{"decoder" (when given), "clips_decoded", "fallback_decodes", "files_needing_fallback",
        "fallback_examples"}``, over every part ``gather`` returns (e.g. an all-gather: one part per
        distributed rank)."""
        parts = gather((self.clips, self.fallbacks, sorted(self.files)))
        files = sorted({f for _, _, names in parts for f in names})
        return {**({"decoder": self.decoder} if self.decoder else {}), "clips_decoded": sum(p[0] for p in parts),
                "fallback_decodes": sum(p[1] for p in parts),
                "files_needing_fallback": len(files), "fallback_examples": files[:self.EXAMPLES]}


class _Watched:
    def __init__(self, loader, tally: DecodeTally):
        self.loader, self.tally = loader, tally

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in self.loader:
            self.tally.add(batch)
            yield batch


def decode_stats_line(record: Dict[str, Any]) -> str:
    """'3 of 120 clips decoded through from the start (2 files cannot be seeked exactly, e.g. a.avi)', or ''."""
    if not record["fallback_decodes"]:
        return ""
    example = f", e.g. {record['fallback_examples'][0]}" if record["fallback_examples"] else ""
    return (f"{record['fallback_decodes']} of {record['clips_decoded']} clips decoded through from the start "
            f"({record['files_needing_fallback']} file(s) cannot be seeked exactly{example})")


class ClipLoader(DataLoader):
    """A DataLoader whose :meth:`set_epoch` reseeds the dataset, the shuffle and the sampler."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        elif isinstance(self.sampler, RandomSampler) and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self._shuffle_seed + epoch)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    *,
    distributed: Optional[bool] = None,
    drop_last: bool = False,
    seed: int = 0,
    prefetch_factor: int = 2,
) -> ClipLoader:
    """A :class:`ClipLoader` over ``dataset`` with :func:`collate`.

    Uses ``workers`` worker processes (persistent across epochs), pinned memory when CUDA is
    available, and a :class:`DistributedSampler` when ``distributed`` is True or, by default,
    when torch.distributed is initialised. Shuffling is seeded by ``seed + epoch``; call
    ``loader.set_epoch(epoch)`` before each epoch.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    generator = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    # Workers' base seed comes from this generator, not the global RNG: building or iterating a loader (an
    # evaluation mid-training, a resumed run's new loader) then leaves the training RNG stream untouched.
    # (A separate generator from the sampler's, so the shuffle stays the DistributedSampler permutation.)
    worker_seeds = torch.Generator()
    worker_seeds.manual_seed(seed)
    loader = ClipLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=worker_seeds,
        **extra,
    )
    loader._shuffle_seed = seed
    return loader


# ----------------------------------------------------------------------------------- the loader factory


def parse_views(views: str) -> Tuple[int, int]:
    """'4x3' → (4 temporal clips, 3 spatial crops)."""
    try:
        clips, crops = (int(v) for v in views.lower().split("x"))
    except ValueError:
        raise UsageError(f"--views must look like CLIPSxCROPS, e.g. 4x3, got {views!r}") from None
    if clips < 1 or crops not in (1, 3, 4):
        raise UsageError(f"--views {views}: need >= 1 clip and 1, 3 or 4 crops")
    return clips, crops


@dataclass(frozen=True)
class DecoderChoice:
    """The decoder a run uses (``name``: "pyav", "torchcodec" or "dali") and, when ``--decoder auto`` wanted
    DALI on a GPU where it cannot start, why not (``fallback``)."""

    name: str
    fallback: Optional[str] = None

    @property
    def description(self) -> str:
        """For the run's records: 'dali', 'pyav', or 'pyav (fallback: DALI cannot start on GPU 0: ...)'."""
        return self.name if self.fallback is None else f"{self.name} (fallback: {self.fallback})"

    @property
    def notice(self) -> str:
        """The line to print when the choice is a fallback, else ''."""
        return "" if self.fallback is None else f"--decoder auto: {self.fallback}; decoding with PyAV instead"


def resolve_decoder(choice: str, device: torch.device,
                    gather: Callable[[Any], List[Any]] = lambda part: [part],
                    cpu_augment: Optional[str] = None) -> DecoderChoice:
    """The decoder a loader uses, decided before the model is built.

    "pyav": PyAV. "torchcodec": torchcodec, checked to be importable. "dali": DALI, checked to be importable
    and, on CUDA, to decode on ``device``'s GPU (:func:`~.frames.dali_gpu_problem`; else
    :class:`~.dali.DALIStartError`). "auto": DALI on CUDA when it is
    installed and decodes on that GPU; PyAV otherwise (on the CPU, PyAV's sparse decoder was faster than
    torchcodec on H.264: see the README's loader table), with the reason as ``fallback`` when DALI is installed
    but cannot start there. ``gather`` (an all-gather over distributed ranks) makes every process decide alike:
    PyAV everywhere when any process's GPU fell back, as the ranks' loaders must yield the same batches.
    ``cpu_augment``: the training augmentation only the PyAV and torchcodec paths run (RandAugment, random
    resized crop), if any: "auto" is then PyAV, and "dali" an error naming it.
    """
    if choice == "dali" and cpu_augment:
        raise UsageError(f"--decoder dali: its pipeline has no {cpu_augment}; use --decoder pyav (or auto)")
    mine = _own_decoder(choice, device, cpu_augment)
    fallen = [c for c in gather(mine) if c.fallback is not None]
    return DecoderChoice("pyav", fallen[0].fallback) if fallen else mine


def cpu_only_augment(resize: str, rand_augment: Optional[str]) -> Optional[str]:
    """The training augmentation among ``resize`` and ``rand_augment`` that only the PyAV and torchcodec paths
    run (the DALI pipeline has the default short-side jitter only), or None."""
    if rand_augment:
        return f"RandAugment (train.rand_augment={rand_augment})"
    if resize != "short_side_jitter":
        return f"train.resize={resize}"
    return None


def _own_decoder(choice: str, device: torch.device, cpu_augment: Optional[str]) -> DecoderChoice:
    # dali_available() imports DALI (seconds, CUDA libraries): only "auto" asks it
    if choice == "pyav" or (choice == "auto" and not (device.type == "cuda" and not cpu_augment
                                                         and dali_available())):
        return DecoderChoice("pyav")
    if choice == "torchcodec":
        require_torchcodec()
        return DecoderChoice("torchcodec")
    if choice != "dali" and choice != "auto":
        raise UsageError(f"decoder must be auto, pyav, torchcodec or dali, got {choice!r}")
    require_dali()
    if device.type != "cuda":
        return DecoderChoice("dali")
    problem = dali_gpu_problem(device.index)
    if problem is None:
        return DecoderChoice("dali")
    where = "the current GPU" if device.index is None else f"GPU {device.index}"
    if choice == "dali":
        raise DALIStartError(where, f"{problem} (--decoder pyav decodes on the CPU)")
    return DecoderChoice("pyav", f"DALI cannot start on {where} ({problem})")


def build_clip_loader(samples, *, train: bool, decoder: str, device: torch.device, batch_size: int, workers: int,
                      num_frames: int, size: int, sampling: str, stride: int, seed: int, flip: bool = True,
                      views: str = "1x1", resize: str = "short_side_jitter",
                      scale_range: Tuple[float, float] = (1.0, 1.15), rand_augment: Optional[str] = None):
    """Batches of clips ({"video", "label", "index", "skipped"}) from ``samples``, with ``set_epoch``.

    decoder "pyav": VideoClipDataset in ``workers`` DataLoader workers. decoder "dali": a DALIClipLoader,
    one DALI pipeline (``workers`` threads) that decodes, resizes, crops and normalises whole batches, on
    ``device``'s GPU when it is CUDA, two batches ahead on a background thread. Either way sharded over
    torch.distributed ranks, training batches shuffled and full, evaluation batches ``views`` (CLIPSxCROPS)
    per video. ``resize``, ``scale_range``, ``rand_augment``: the training augmentation (see
    :class:`VideoClipDataset`; DALI has the default only).
    """
    clips, crops = (1, 1) if train else parse_views(views)
    if decoder == "dali":
        missing = cpu_only_augment(resize, rand_augment) if train else None
        if missing:
            raise UsageError(f"the DALI loader has no {missing}; use the pyav decoder")
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        return DALIClipLoader(samples, batch_size=batch_size, num_frames=num_frames, size=size, train=train,
                              sampling=sampling, stride=stride, flip=flip, drop_last=train, seed=seed,
                              device="mixed" if device.type == "cuda" else "cpu", device_id=device.index,
                              num_threads=max(1, workers),
                              shard_id=rank, num_shards=world, num_clips=clips, num_crops=crops,
                              scale_range=scale_range)
    dataset = VideoClipDataset(samples, num_frames=num_frames, sampling=sampling, stride=stride, size=size,
                               train=train, flip=flip, num_clips=clips, num_crops=crops, decoder=decoder, seed=seed,
                               resize=resize, scale_range=scale_range, rand_augment=rand_augment)
    return build_loader(dataset, batch_size, workers, shuffle=train, drop_last=train, seed=seed)


def batches_from(loader, start: int) -> Iterable:
    """The loader's batches for the current epoch (``set_epoch`` first) from batch ``start`` on: exactly the
    batches an uninterrupted pass yields there, for continuing an interrupted epoch.

    A torch DataLoader replays its batch sampler (the same seeded order) and loads only the batches kept;
    another loader (DALI) decodes the first ``start`` batches and drops them.
    """
    if start == 0:
        return loader
    if not isinstance(loader, DataLoader):
        return itertools.islice(iter(loader), start, None)
    extra = {"persistent_workers": False, "prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    # the loader's own generator seeds the workers, so the global RNG (dropout, masking) is left as it was
    return DataLoader(
        loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, start), num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, generator=loader.generator,
        worker_init_fn=loader.worker_init_fn, **extra)


class _SkipBatches:
    """A batch sampler without its first ``start`` batches (their indices are drawn, not loaded)."""

    def __init__(self, batch_sampler, start: int):
        self.batch_sampler, self.start = batch_sampler, start

    def __iter__(self) -> Iterator[List[int]]:
        return itertools.islice(iter(self.batch_sampler), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.start)
