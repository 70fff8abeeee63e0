"""Pieces shared by ``train`` and ``evaluate``: distributed setup, precision, checkpoints, the data
command-line arguments, and top-k metrics over multi-view predictions."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .cli import int_at_least, load_checkpoint_file
from .data import (DatasetError, VideoClipDataset, build_loader, check_samples, read_hmdb51, read_kinetics_csv,
                   read_list_file, read_ssv2_json, read_ucf101)
from .data.datasets import official_split, read_split_file

# ------------------------------------------------------------------------------------------ distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU) and pick the device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def all_gather_objects(obj: Any) -> List[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------- precision


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' → bf16 on CUDA, none on CPU; 'bf16' / 'fp16' / 'none' as named (fp16 only on CUDA)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp in ("none", "fp32", None):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast needs CUDA; use amp=bf16 on CPU")
        return torch.float16
    raise ValueError(f"unknown amp {amp!r}; expected auto, none, bf16 or fp16")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ------------------------------------------------------------------------------------------ checkpoints


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file.

    The file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask), not
    mkstemp's private 0o600, so others in a shared group can read checkpoints.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def backbone_source(pretrained: Optional[str]) -> Optional[str]:
    """``pretrained`` as a checkpoint stores it: a local file as its absolute path (so the checkpoint
    works from any directory), an open_clip tag or None unchanged."""
    if pretrained is not None and Path(pretrained).is_file():
        return os.path.abspath(pretrained)
    return pretrained


def model_checkpoint(model, pretrained: Optional[str]) -> Dict[str, Any]:
    """What rebuilds the model: its config, class names, the backbone source and the tuned weights.

    A randomly initialised backbone (pretrained=None) cannot be re-created, so its weights are stored too.
    A local backbone file is stored as its absolute path and its size (``pretrained_size``), which
    :func:`load_model_checkpoint` compares to notice a replaced file.
    """
    state = model.state_dict() if pretrained is None else model.tunable_state_dict()
    config = asdict(model.config)
    source = backbone_source(pretrained)
    size = os.path.getsize(source) if source is not None and Path(source).is_file() else None
    return {"config": config, "class_names": model.class_names, "pretrained": source, "pretrained_size": size,
            "model": {k: v.detach().cpu() for k, v in state.items()}}


def _looks_like_file(pretrained: str, ckpt: Dict[str, Any]) -> bool:
    # open_clip tags are bare words ("openai", "laion2b_s34b_b79k"); a stored size or a path shape means a file
    return (ckpt.get("pretrained_size") is not None or os.sep in pretrained or "/" in pretrained
            or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))


def checkpoint_backbone(ckpt: Dict[str, Any], pretrained: Optional[str] = None) -> Optional[str]:
    """The backbone weights to build a checkpoint's model on: ``pretrained`` when given (the user's
    override), else the checkpoint's own source. A stored local file must still exist (else
    FileNotFoundError naming --pretrained); a size that changed since training is warned about."""
    if pretrained is not None:
        return pretrained
    source = ckpt.get("pretrained")
    if source is None or not _looks_like_file(source, ckpt):
        return source
    if not Path(source).is_file():
        raise FileNotFoundError(f"the checkpoint's backbone weights file {source} was not found; pass --pretrained "
                                f"with the file's new location")
    size = ckpt.get("pretrained_size")
    if size is not None and os.path.getsize(source) != size:
        print(f"warning: backbone weights file {source} is {os.path.getsize(source)} bytes, but was {size} bytes "
              f"when the checkpoint was written: replaced by another file? (the frozen backbone is not in the "
              f"checkpoint)", file=sys.stderr)
    return source


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def whole_model_follows(whole: bool = True):
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building a model
    whose every weight is loaded from a checkpoint next (``whole``: a random backbone is stored whole);
    with ``whole`` False, nothing is silenced."""
    if not whole:
        yield
        return
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)  # open_clip logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_weights(model, weights: Dict[str, torch.Tensor], whole: bool, where: str) -> None:
    """Load a checkpoint's weights into ``model``. ``whole`` (a checkpoint of a random backbone): every key of
    the model is required; else every tuned parameter is. Keys the model doesn't have are always an error."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    required = set(missing) if whole else {n for n, p in model.named_parameters() if p.requires_grad} & set(missing)
    if unexpected or required:
        kind = "weights" if whole else "tuned weights"
        raise ValueError(f"{where}: checkpoint does not match the model ({len(required)} missing {kind} "
                         f"{sorted(required)[:5]}, {len(unexpected)} unexpected {sorted(unexpected)[:5]})")


def load_model_checkpoint(path: Path, map_location="cpu", pretrained: Optional[str] = None, **overrides):
    """Rebuild an M2CLIP from a checkpoint written by ``train`` (or ``convert``). ``pretrained`` replaces the
    checkpoint's backbone source (e.g. when its weights file moved). Returns ``(model, checkpoint dict)``."""
    from .model import create_model
    from .presets import M2CLIPConfig

    ckpt = load_checkpoint_file(path, "checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not an m2clip-fast checkpoint (no 'config'/'model' entries)")
    config = M2CLIPConfig(**{k: tuple(v) if k == "templates" else v for k, v in ckpt["config"].items()})
    source = checkpoint_backbone(ckpt, pretrained)
    whole = ckpt["pretrained"] is None
    with whole_model_follows(whole):
        model = create_model(config, pretrained=source, class_names=ckpt["class_names"], **overrides)
    load_weights(model, ckpt["model"], whole, str(path))
    return model, ckpt


# -------------------------------------------------------------------------------------------- data args


ANNOTATION_HELP = (
    "annotations, by file name: an mmaction2 list .txt ('relative/path label', labels from 0), a Kinetics .csv "
    "(videos ROOT/<label>/ID_START_END.mp4 or ROOT/ID_START_END.mp4, detected), an SSv2 .json (ROOT/ID.webm), "
    "a UCF101 trainlist0N.txt / testlist0N.txt (classInd.txt next to it; videos ROOT/Class/v_*.avi) or any "
    "HMDB51 <class>_test_splitN.txt (split N of its folder; videos ROOT/<class>/*.avi)")


def add_data_args(parser: argparse.ArgumentParser, train: bool) -> None:
    g = parser.add_argument_group("data")
    if train:
        g.add_argument("--train-list", help=f"training {ANNOTATION_HELP}")
        g.add_argument("--val-list", help="validation annotations (same formats; HMDB51: the videos marked 2)")
    else:
        g.add_argument("--val-list", help=f"evaluation {ANNOTATION_HELP}")
    g.add_argument("--data-root", default=None,
                   help="ROOT, the folder the annotation paths are relative to; default, for every format: the "
                        "annotation file's own folder (give it when the videos live elsewhere, e.g. "
                        "k400/videos for k400/train.csv)")
    g.add_argument("--class-names", default=None, help="class-name file, one per line (line i = label i)")
    g.add_argument("--decoder", choices=("auto", "pyav", "dali"), default="auto",
                   help="video decoder: auto = DALI on CUDA when installed, else PyAV")
    g.add_argument("--skip-missing", action="store_true",
                   help="drop missing files (listed in skipped.jsonl) instead of stopping before the run; "
                        "unreadable or empty files are always replaced during training and left out of evaluation")
    g.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers per process")


# argparse types for counts (the shared helper names the option and the bound in its message)
positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def views_arg(text: str) -> str:
    """argparse type: CLIPSxCROPS, checked by :func:`parse_views` before anything is built."""
    try:
        parse_views(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def splits_arg(text: str) -> List[int]:
    """argparse type: official split numbers, e.g. '1,2,3' → [1, 2, 3]."""
    try:
        splits = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected split numbers like 1,2,3, got {text!r}") from None
    if not splits or any(s not in (1, 2, 3) for s in splits) or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"splits are 1, 2 and/or 3 (each once), got {text!r}")
    return splits


def resolve_decoder(choice: str, device: torch.device) -> str:
    if choice != "auto":
        if choice == "dali":
            from .data.dali import require_dali
            require_dali()  # a clear error now, not after the model is built
        return choice
    if device.type == "cuda":
        from .data.dali import dali_available
        if dali_available():
            return "dali"
    return "pyav"


def build_clip_loader(samples, *, train: bool, decoder: str, device: torch.device, batch_size: int, workers: int,
                      num_frames: int, size: int, sampling: str, stride: int, seed: int, flip: bool = True,
                      views: str = "1x1"):
    """Batches of clips ({"video", "label", "index", "skipped"}) from ``samples``, with ``set_epoch``.

    decoder "pyav": VideoClipDataset in ``workers`` DataLoader workers. decoder "dali": a DALIClipLoader,
    one DALI pipeline (``workers`` threads) that decodes, resizes, crops and normalises whole batches, on
    the GPU when ``device`` is CUDA. Either way sharded over torch.distributed ranks, training batches
    shuffled and full, evaluation batches ``views`` (CLIPSxCROPS) per video.
    """
    clips, crops = (1, 1) if train else parse_views(views)
    if decoder == "dali":
        from .data.dali import DALIClipLoader

        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        return DALIClipLoader(samples, batch_size=batch_size, num_frames=num_frames, size=size, train=train,
                              sampling=sampling, stride=stride, flip=flip, drop_last=train, seed=seed,
                              device="mixed" if device.type == "cuda" else "cpu", num_threads=max(1, workers),
                              shard_id=rank, num_shards=world, num_clips=clips, num_crops=crops)
    dataset = VideoClipDataset(samples, num_frames=num_frames, sampling=sampling, stride=stride, size=size,
                               train=train, flip=flip, num_clips=clips, num_crops=crops, decoder=decoder, seed=seed)
    return build_loader(dataset, batch_size, workers, shuffle=train, drop_last=train, seed=seed)


def annotation_root(path: str, data_root: Optional[str]) -> str:
    """Where an annotation file's video paths are joined: ``--data-root``, else the file's own folder."""
    return data_root if data_root is not None else str(Path(path).parent)


def read_annotations(path: str, data_root: Optional[str], class_names: Sequence[str], train: bool = True):
    """Samples of an annotation file, by its name: a UCF101/HMDB51 official split file (see
    :func:`~m2clip_fast.data.datasets.official_split`; HMDB51 takes the videos marked 1 when ``train``, else 2),
    .csv Kinetics, .json SSv2, anything else a list file (labels from 0)."""
    suffix = Path(path).suffix.lower()
    root = annotation_root(path, data_root)
    if official_split(path) is not None:
        return read_split_file(path, root, train=train, class_names=class_names)
    if suffix == ".csv":
        return read_kinetics_csv(path, root, class_names)
    if suffix == ".json":
        return read_ssv2_json(path, root, {n: i for i, n in enumerate(class_names)})
    return read_list_file(path, root)


def read_split(dataset: str, split_dir: str, data_root: str, split: int, train: bool, class_names=None):
    """UCF101 / HMDB51 official split files."""
    if dataset == "ucf101":
        return read_ucf101(split_dir, data_root, split=split, train=train)
    if dataset == "hmdb51":
        return read_hmdb51(split_dir, data_root, split=split, train=train, class_names=class_names)
    raise ValueError(f"split files are read for ucf101 or hmdb51, not {dataset!r}")


def load_samples(path: str, data_root: Optional[str], class_names: Sequence[str], *, train: bool,
                 skip_missing: bool, what: str) -> Tuple[list, List[Dict[str, str]]]:
    """Read and check an annotation file: ``(kept samples, dropped missing files)``."""
    samples = read_annotations(path, data_root, class_names, train=train)
    return check_samples(samples, len(class_names), skip_missing=skip_missing, what=f"{what} {path}",
                         root=annotation_root(path, data_root))


def batches_from(loader, start: int) -> Iterable:
    """The loader's batches for the current epoch (``set_epoch`` first) from batch ``start`` on: exactly the
    batches an uninterrupted pass yields there, for continuing an interrupted epoch.

    A torch DataLoader replays its batch sampler (the same seeded order) and loads only the batches kept;
    another loader (DALI) decodes the first ``start`` batches and drops them.
    """
    if start == 0:
        return loader
    if not isinstance(loader, torch.utils.data.DataLoader):
        return itertools.islice(iter(loader), start, None)
    extra = {"persistent_workers": False, "prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    # the loader's own generator seeds the workers, so the global RNG (dropout, masking) is left as it was
    return torch.utils.data.DataLoader(
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


# ---------------------------------------------------------------------------------------------- metrics


def parse_views(views: str) -> Tuple[int, int]:
    """'4x3' → (4 temporal clips, 3 spatial crops)."""
    try:
        clips, crops = (int(v) for v in views.lower().split("x"))
    except ValueError:
        raise ValueError(f"--views must look like CLIPSxCROPS, e.g. 4x3, got {views!r}") from None
    if clips < 1 or crops not in (1, 3, 4):
        raise ValueError(f"--views {views}: need >= 1 clip and 1, 3 or 4 crops")
    return clips, crops


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    k_max = min(max(ks), probs.shape[1])
    top = probs.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate_loader(model, loader, device, amp_dtype, class_names=None, templates=None,
                    progress: bool = False) -> Tuple[Dict[str, float], List[Dict[str, str]]]:
    """Top-1/top-5 (%) per head over a loader of multi-view clips (B, V, T, 3, H, W); scores are averaged
    over views. Under torch.distributed, every sample is counted exactly once across ranks.

    Returns ``(metrics, skipped)``. A video that cannot be decoded has no prediction: it is left out of
    the accuracy (``metrics["num_samples"]`` counts the videos scored, ``metrics["excluded"]`` those left
    out), and ``skipped`` lists it as ``{"path", "reason"}``, sorted by path. The global RNG is left as it
    was, so evaluating in the middle of training doesn't change what training does next.
    """
    model.eval()
    per_sample: Dict[int, Tuple[Dict[str, torch.Tensor], int]] = {}
    iterator = loader
    if progress:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, file=sys.stderr)
    skipped = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in iterator:
            video = batch["video"].to(device, non_blocking=True)
            b, v = video.shape[:2]
            with autocast(device, amp_dtype):
                probs = model.predict(video.flatten(0, 1), class_names=class_names, templates=templates)
            for head, p in probs.items():
                probs[head] = p.float().reshape(b, v, -1).mean(dim=1).cpu()
            for i, (index, label) in enumerate(zip(batch["index"].tolist(), batch["label"].tolist())):
                per_sample[index] = ({h: p[i] for h, p in probs.items()}, label)
            skipped.extend(batch["skipped"])
    merged: Dict[int, Tuple[Dict[str, torch.Tensor], int]] = {}
    for part in all_gather_objects(per_sample):
        merged.update(part)  # a DistributedSampler pads with repeats: keyed by sample, each counts once
    # a bad video is met as the item itself (and maybe again as another bad item's replacement): once each
    bad: Dict[str, str] = {}
    for part in all_gather_objects(skipped):
        for s in part:
            bad.setdefault(s["path"], s["reason"])
    if not merged:
        raise DatasetError(f"evaluation produced no predictions ({len(bad)} unreadable videos)")
    labels = torch.tensor([label for _, label in merged.values()])
    metrics: Dict[str, float] = {"num_samples": len(merged), "excluded": len(bad)}
    for head in next(iter(merged.values()))[0]:
        probs = torch.stack([p[head] for p, _ in merged.values()])
        correct = topk_correct(probs, labels)
        metrics[f"top1_{head}"] = 100.0 * correct[1] / len(merged)
        metrics[f"top5_{head}"] = 100.0 * correct[5] / len(merged)
    return metrics, [{"path": path, "reason": reason} for path, reason in sorted(bad.items())]


def excluded_note(metrics: Dict[str, Any]) -> str:
    """'2 unreadable videos excluded; accuracy over 8 of 10 videos', or '' when none was."""
    n, m = metrics.get("excluded", 0), metrics["num_samples"]
    if not n:
        return ""
    return f"{n} unreadable video{'s' if n != 1 else ''} excluded; accuracy over {m} of {n + m} videos"


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
