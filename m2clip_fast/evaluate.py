"""``python -m m2clip_fast.evaluate``: multi-view top-1/top-5 per head, or zero-shot over UCF101/HMDB51 splits.

Supervised: ``--checkpoint F --val-list F [--data-root D] --views 4x3`` scores every head (vc, text, fused),
averaging class probabilities over CLIPSxCROPS views.
Zero-shot: ``--checkpoint F --zero-shot ucf101|hmdb51 --split-dir D --data-root D`` encodes the target dataset's
class names with a prompt ensemble and reports top-1/top-5 of the text head on the test list of each official
split, then mean ± std over the splits, as the paper reports.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import engine
from .text import ZERO_SHOT_TEMPLATES, load_class_names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by m2clip_fast.train")
    p.add_argument("--views", default="1x1", help="CLIPSxCROPS: temporal clips x spatial crops (1, 3 or 4)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per step (each has CLIPS*CROPS views)")
    p.add_argument("--zero-shot", choices=("ucf101", "hmdb51"), default=None)
    p.add_argument("--split-dir", default=None, help="folder with the official split files (zero-shot)")
    p.add_argument("--splits", default="1,2,3", help="zero-shot splits to evaluate")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), none, bf16, fp16")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    engine.add_data_args(p, train=False)
    args = p.parse_args(argv)
    if args.zero_shot is None and not args.val_list:
        p.error("give --val-list, or --zero-shot with --split-dir")
    if args.zero_shot is not None and not (args.split_dir and args.data_root):
        p.error("--zero-shot needs --split-dir and --data-root")
    return args


def _loader(model, samples, args, decoder: str, device, sampling: str, stride: int, workers: int):
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    return engine.build_clip_loader(samples, train=False, decoder=decoder, device=device, views=args.views,
                                    batch_size=args.batch_size, workers=workers, num_frames=model.num_frames,
                                    size=size, sampling=sampling, stride=stride, seed=0)


def evaluate(args: argparse.Namespace) -> Dict[str, object]:
    info, device = engine.init_distributed(args.device)
    model, ckpt = engine.load_model_checkpoint(Path(args.checkpoint))
    model.to(device)
    amp_dtype = engine.resolve_amp(args.amp, device)
    if device.type == "cuda" and amp_dtype is not None:
        model.set_backbone_dtype(amp_dtype)
    train_cfg = ckpt["config"].get("train", {})
    decoder = engine.resolve_decoder(args.decoder, device)
    workers = train_cfg.get("workers", 2) if args.workers is None else args.workers
    sampling, stride = train_cfg.get("sampling", "dense"), train_cfg.get("stride", 8)
    result: Dict[str, object] = {"checkpoint": str(args.checkpoint), "views": args.views}

    if args.zero_shot is None:
        names = load_class_names(args.class_names) if args.class_names else model.class_names
        if list(names) != model.class_names:
            raise ValueError(f"--class-names gives {len(names)} classes that differ from the checkpoint's "
                             f"{len(model.class_names)}; use --zero-shot for another label set")
        samples, dropped = engine.checked(engine.read_annotations(args.val_list, args.data_root, names), len(names),
                                          args.skip_missing, f"validation list {args.val_list}")
        metrics = engine.evaluate_loader(model, _loader(model, samples, args, decoder, device, sampling, stride, workers),
                                         device, amp_dtype, progress=info.is_main)
        result.update(metrics, dropped=len(dropped))
        return result

    names = load_class_names(args.class_names or args.zero_shot)
    per_split: List[Dict[str, float]] = []
    for split in (int(s) for s in args.splits.split(",")):
        samples = engine.read_split(args.zero_shot, args.split_dir, args.data_root, split, train=False,
                                    class_names=names)
        samples, dropped = engine.checked(samples, len(names), args.skip_missing, f"{args.zero_shot} split {split}")
        metrics = engine.evaluate_loader(model, _loader(model, samples, args, decoder, device, sampling, stride, workers),
                                         device, amp_dtype, class_names=names, templates=ZERO_SHOT_TEMPLATES,
                                         progress=info.is_main)
        per_split.append({"split": split, "top1": metrics["top1_text"], "top5": metrics["top5_text"],
                          "num_samples": metrics["num_samples"], "dropped": len(dropped)})
    top1 = [s["top1"] for s in per_split]
    result.update(dataset=args.zero_shot, splits=per_split, top1_mean=statistics.fmean(top1),
                  top1_std=statistics.pstdev(top1) if len(top1) > 1 else 0.0)
    return result


def format_result(result: Dict[str, object]) -> str:
    if "splits" in result:
        lines = [f"zero-shot {result['dataset']} ({result['views']} views):"]
        lines += [f"  split {s['split']}: top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%  ({s['num_samples']} videos)"
                  for s in result["splits"]]
        lines.append(f"  top-1 {result['top1_mean']:.2f} ± {result['top1_std']:.2f}% over {len(result['splits'])} splits")
        return "\n".join(lines)
    lines = [f"{result['num_samples']} videos, {result['views']} views:"]
    for head in ("vc", "text", "fused"):
        if f"top1_{head}" in result:
            lines.append(f"  {head:<6} top-1 {result[f'top1_{head}']:.2f}%  top-5 {result[f'top5_{head}']:.2f}%")
    if result.get("skipped"):
        lines.append(f"  {result['skipped']} unreadable video(s) were replaced")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(result) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
