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

from . import runtime
from .checkpoint import TRUST_HELP, load_model_checkpoint
from .cli import add_data_args, int_at_least, run_main, splits_arg, views_arg
from .data.datasets import check_samples, load_samples, read_split
from .data.loader import DecodeTally, build_clip_loader, decode_stats_line, resolve_decoder
from .errors import UsageError
from .evaluation import collect_predictions, excluded_note, scores
from .report import report_dir, write_report
from .text import ZERO_SHOT_TEMPLATES, load_class_names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by m2clip_fast.train or convert")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights (open_clip tag or local file) instead of the checkpoint's own source, "
                        "e.g. when its weights file has moved")
    p.add_argument("--views", type=views_arg, default="1x1",
                   help="CLIPSxCROPS: temporal clips x spatial crops (1, 3 or 4)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4,
                   help="videos per step (each has CLIPS*CROPS views)")
    p.add_argument("--zero-shot", choices=("ucf101", "hmdb51"), default=None)
    p.add_argument("--split-dir", default=None, help="folder with the official split files (zero-shot)")
    p.add_argument("--splits", type=splits_arg, default=[1, 2, 3], help="zero-shot splits, e.g. 1,2,3")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), none, bf16, fp16")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="also write per-class accuracy, the confusion matrix (CSV, PNG) and per-video predictions "
                        "to DIR (zero-shot: DIR/split_N)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    add_data_args(p, train=False)
    args = p.parse_args(argv)
    if args.zero_shot is None and not args.val_list:
        p.error("give --val-list, or --zero-shot with --split-dir")
    if args.zero_shot is not None and not (args.split_dir and args.data_root):
        p.error("--zero-shot needs --split-dir and --data-root")
    if args.zero_shot is not None and args.val_list:
        p.error("--zero-shot reads the test lists of --split-dir; --val-list would be ignored: give one of them")
    return args


def _loader(model, samples, args, decoder: str, device, sampling: str, stride: int, workers: int):
    return build_clip_loader(samples, train=False, decoder=decoder, device=device, views=args.views,
                             batch_size=args.batch_size, workers=workers, num_frames=model.num_frames,
                             size=model.crop_size, sampling=sampling, stride=stride, seed=0)


def evaluate(args: argparse.Namespace) -> Dict[str, object]:
    """Scores of ``args.checkpoint``: every head's top-1/top-5 on ``--val-list``, or the text head's zero-shot
    accuracy per split. Unreadable videos are left out of the accuracy, counted (``excluded``) and listed
    (``skipped``: path and reason)."""
    info, device = runtime.init_distributed(args.device)
    if args.zero_shot is None:
        names = load_class_names(args.class_names) if args.class_names else None
    else:
        names = load_class_names(args.class_names or args.zero_shot)
        splits = _zero_shot_splits(args, names)  # every split file read and checked before the model is built
    model, ckpt = load_model_checkpoint(Path(args.checkpoint), pretrained=args.pretrained,
                                        trust=args.trust_checkpoint)
    amp_dtype = runtime.place_model(model, device, args.amp)
    train_cfg = ckpt["config"].get("train", {})
    decoder = resolve_decoder(args.decoder, device, runtime.all_gather_objects)
    if info.is_main and decoder.notice:
        print(decoder.notice, file=sys.stderr)  # stdout may be --json
    workers = train_cfg.get("workers", 2) if args.workers is None else args.workers
    sampling, stride = train_cfg.get("sampling", "dense"), train_cfg.get("stride", 8)
    result: Dict[str, object] = {"checkpoint": str(args.checkpoint), "views": args.views}

    def run(samples, split=None, **zero_shot):
        loader = _loader(model, samples, args, decoder.name, device, sampling, stride, workers)
        decoding = DecodeTally(decoder.description)
        predictions, bad = collect_predictions(model, decoding.watch(loader), device, amp_dtype,
                                               progress=info.is_main, **zero_shot)
        if args.report is not None and info.is_main:
            write_report(report_dir(args.report, split), predictions, [path for path, _ in samples],
                         zero_shot.get("class_names", model.class_names))
        metrics, skipped = scores(predictions, bad)
        return {**metrics, "decode_stats": decoding.record(runtime.all_gather_objects)}, skipped

    if args.zero_shot is None:
        names = names if names is not None else model.class_names
        if list(names) != model.class_names:
            raise UsageError(f"--class-names gives {len(names)} classes that differ from the checkpoint's "
                             f"{len(model.class_names)}; use --zero-shot for another label set")
        samples, dropped = load_samples(args.val_list, args.data_root, names, train=False,
                                               skip_missing=args.skip_missing, what="validation list")
        metrics, skipped = run(samples)
        result.update(metrics, dropped=len(dropped), skipped=skipped)
        return result

    per_split: List[Dict[str, object]] = []
    for split, (samples, dropped) in splits.items():
        metrics, skipped = run(samples, split, class_names=names, templates=ZERO_SHOT_TEMPLATES)
        per_split.append({"split": split, "top1": metrics["top1_text"], "top5": metrics["top5_text"],
                          "num_samples": metrics["num_samples"], "excluded": metrics["excluded"],
                          "dropped": len(dropped), "skipped": skipped, "decode_stats": metrics["decode_stats"]})
    top1 = [s["top1"] for s in per_split]
    result.update(dataset=args.zero_shot, splits=per_split, top1_mean=statistics.fmean(top1),
                  top1_std=statistics.pstdev(top1) if len(top1) > 1 else 0.0)
    return result


def _zero_shot_splits(args: argparse.Namespace, names: List[str]) -> Dict[int, tuple]:
    """``{split: (samples, dropped)}`` for every asked split, all read and checked before any is evaluated,
    so that a missing split file is reported at once, not after the earlier splits have run."""
    splits = {}
    for split in args.splits:
        samples = read_split(args.zero_shot, args.split_dir, args.data_root, split, train=False,
                                    class_names=names)
        splits[split] = check_samples(samples, len(names), skip_missing=args.skip_missing,
                                      what=f"{args.zero_shot} split {split}", root=args.data_root)
    return splits


def _skipped_lines(skipped: List[Dict[str, str]], note: str) -> List[str]:
    return [f"  {note}:"] + [f"    {s['path']}: {s['reason']}" for s in skipped] if skipped else []


def _decode_lines(result: Dict[str, object]) -> List[str]:
    line = decode_stats_line(result["decode_stats"])
    return [f"  {line}"] if line else []


def format_result(result: Dict[str, object]) -> str:
    if "splits" in result:
        lines = [f"zero-shot {result['dataset']} ({result['views']} views):"]
        for s in result["splits"]:
            lines.append(f"  split {s['split']}: top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%  "
                         f"({s['num_samples']} videos)")
            lines += _skipped_lines(s["skipped"], excluded_note(s)) + _decode_lines(s)
        lines.append(f"  top-1 {result['top1_mean']:.2f} ± {result['top1_std']:.2f}% over {len(result['splits'])} splits")
        return "\n".join(lines)
    lines = [f"{result['num_samples']} videos, {result['views']} views:"]
    for head in ("vc", "text", "fused"):
        if f"top1_{head}" in result:
            lines.append(f"  {head:<6} top-1 {result[f'top1_{head}']:.2f}%  top-5 {result[f'top5_{head}']:.2f}%")
    lines += _skipped_lines(result["skipped"], excluded_note(result)) + _decode_lines(result)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    def run() -> int:
        args = parse_args(argv)
        try:
            result = evaluate(args)
        finally:
            runtime.shutdown_distributed()
        print(json.dumps(result) if args.json else format_result(result))
        return 0

    return run_main(run, "python -m m2clip_fast.evaluate")


if __name__ == "__main__":
    sys.exit(main())
