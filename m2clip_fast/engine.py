"""Pieces shared by ``train`` and ``evaluate``: distributed setup, precision, checkpoints, the data
command-line arguments, and top-k metrics over multi-view predictions."""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .data import (DatasetError, VideoClipDataset, build_loader, check_samples, read_hmdb51, read_kinetics_csv,
                   read_list_file, read_ssv2_json, read_ucf101)

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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def model_checkpoint(model, pretrained: Optional[str]) -> Dict[str, Any]:
    """What rebuilds the model: its config, class names, the backbone source and the tuned weights.
    A randomly initialised backbone (pretrained=None) cannot be re-created, so its weights are stored too."""
    state = model.state_dict() if pretrained is None else model.tunable_state_dict()
    config = asdict(model.config)
    return {"config": config, "class_names": model.class_names, "pretrained": pretrained,
            "model": {k: v.detach().cpu() for k, v in state.items()}}


def load_model_checkpoint(path: Path, map_location="cpu", **overrides):
    """Rebuild an M2CLIP from a checkpoint written by ``train``."""
    from .model import create_model
    from .presets import M2CLIPConfig

    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not an m2clip-fast checkpoint (no 'config'/'model' entries)")
    config = M2CLIPConfig(**{k: tuple(v) if k == "templates" else v for k, v in ckpt["config"].items()})
    model = create_model(config, pretrained=ckpt["pretrained"], class_names=ckpt["class_names"], **overrides)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    tunable = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = sorted(tunable & set(missing))
    if unexpected or lost:
        raise ValueError(f"{path}: checkpoint does not match the model (missing tuned weights {lost[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    return model, ckpt


# -------------------------------------------------------------------------------------------- data args


def add_data_args(parser: argparse.ArgumentParser, train: bool) -> None:
    g = parser.add_argument_group("data")
    if train:
        g.add_argument("--train-list", help="training annotations: list .txt, Kinetics .csv or SSv2 .json")
    g.add_argument("--val-list", help="validation annotations (same formats)")
    g.add_argument("--data-root", default=None, help="folder the annotation paths are relative to")
    g.add_argument("--class-names", default=None, help="class-name file, one per line (line i = label i)")
    g.add_argument("--decoder", choices=("auto", "pyav", "dali"), default="auto",
                   help="video decoder: auto = DALI on CUDA when installed, else PyAV")
    g.add_argument("--skip-missing", action="store_true", help="drop missing files (reported) instead of failing")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")


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


def read_annotations(path: str, data_root: Optional[str], class_names: Sequence[str]):
    """Samples of an annotation file, by its format: .csv Kinetics, .json SSv2, anything else a list file."""
    suffix = Path(path).suffix.lower()
    root = data_root if data_root is not None else str(Path(path).parent)
    if suffix == ".csv":
        return read_kinetics_csv(path, root, class_names)
    if suffix == ".json":
        return read_ssv2_json(path, root, {n: i for i, n in enumerate(class_names)})
    return read_list_file(path, data_root)


def read_split(dataset: str, split_dir: str, data_root: str, split: int, train: bool, class_names=None):
    """UCF101 / HMDB51 official split files."""
    if dataset == "ucf101":
        return read_ucf101(split_dir, data_root, split=split, train=train)
    if dataset == "hmdb51":
        return read_hmdb51(split_dir, data_root, split=split, train=train, class_names=class_names)
    raise ValueError(f"split files are read for ucf101 or hmdb51, not {dataset!r}")


def checked(samples, num_classes: int, skip_missing: bool, what: str) -> Tuple[list, List[Dict[str, str]]]:
    kept, dropped = check_samples(samples, num_classes, skip_missing=skip_missing)
    if not kept:
        raise DatasetError(f"{what}: no usable samples left ({len(dropped)} missing)")
    return kept, dropped


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
                    progress: bool = False) -> Dict[str, float]:
    """Top-1/top-5 (%) per head over a loader of multi-view clips (B, V, T, 3, H, W); scores are averaged
    over views. Under torch.distributed, every sample is counted exactly once across ranks."""
    model.eval()
    per_sample: Dict[int, Tuple[Dict[str, torch.Tensor], int]] = {}
    iterator = loader
    if progress:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    skipped = []
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
    if not merged:
        raise DatasetError("evaluation produced no predictions")
    labels = torch.tensor([label for _, label in merged.values()])
    metrics: Dict[str, float] = {"num_samples": len(merged)}
    for head in next(iter(merged.values()))[0]:
        probs = torch.stack([p[head] for p, _ in merged.values()])
        correct = topk_correct(probs, labels)
        metrics[f"top1_{head}"] = 100.0 * correct[1] / len(merged)
        metrics[f"top5_{head}"] = 100.0 * correct[5] / len(merged)
    metrics["skipped"] = len({s["path"] for part in all_gather_objects(skipped) for s in part})
    return metrics


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
