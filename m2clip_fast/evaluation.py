"""Scoring a model over a loader of multi-view clips: top-k, the evaluation loop, and the bad videos met on
the way, gathered over every process."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import torch

from .data.datasets import DatasetError
from .runtime import all_gather_objects, autocast


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    """probs (N, C), labels (N,) → ``{k: how many labels are among the top k}``."""
    k_max = min(max(ks), probs.shape[1])
    top = probs.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


def gather_skipped(skipped: List[Dict[str, Any]]) -> Dict[str, str]:
    """``{path: reason}`` of the bad videos every process met: a bad video is met as the item itself (and
    maybe again as another bad item's replacement, or by another process), and counts once."""
    bad: Dict[str, str] = {}
    for part in all_gather_objects(skipped):
        for s in part:
            bad.setdefault(s["path"], s["reason"])
    return bad


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
    bad = gather_skipped(skipped)
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
