"""``python -m m2clip_fast.evaluate``: multi-view top-1/top-5 per head, zero-shot over UCF101/HMDB51 splits, and
the transfer protocols (K600 zero-shot, few-shot, base-to-novel).

Supervised: ``--checkpoint F --val-list F [--data-root D] --views 4x3`` scores every head (vc, text, fused),
averaging class probabilities over CLIPSxCROPS views.
Zero-shot: ``--checkpoint F --zero-shot ucf101|hmdb51 --split-dir D --data-root D`` encodes the target dataset's
class names with a prompt ensemble and reports top-1/top-5 of the text head on the test list of each official
split, then mean ± std over the splits, as the paper reports.
Transfer protocols, on split files in ViFi-CLIP's format (:mod:`m2clip_fast.data.splits`):
``--protocol k600-zeroshot --split-dir D --data-root D`` (the three 160-class splits, mean ± std),
``--protocol base-to-novel --split-dir D --data-root D`` (base, novel and their harmonic mean) and
``--protocol few-shot --shots 2=F 4=F ... --val-list TEST`` (one checkpoint per K on the full test list).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import runtime
from .checkpoint import TRUST_HELP, load_model_checkpoint
from .cli import add_data_args, int_at_least, run_main, splits_arg, views_arg
from .data.datasets import check_samples, load_samples, read_split
from .data.splits import k600_labels_name, k600_list_name, read_labels_csv, read_split_list
from .data.loader import DecodeTally, DecoderChoice, build_clip_loader, decode_stats_line, resolve_decoder
from .errors import UsageError
from .evaluation import collect_predictions, excluded_note, scores
from .report import report_dir, write_report
from .text import ZERO_SHOT_TEMPLATES, load_class_names
from .transfer import base_to_novel_summary, format_base_to_novel, format_few_shot, split_summary

PROTOCOLS = ("k600-zeroshot", "base-to-novel", "few-shot")


def shot_checkpoint(text: str) -> Tuple[int, str]:
    """argparse type: 'K=checkpoint', e.g. '2=runs/k2/checkpoints/last.pt'."""
    k, sep, path = text.partition("=")
    if not sep or not k.isdigit() or int(k) < 1 or not path:
        raise argparse.ArgumentTypeError(f"expected K=CHECKPOINT (K a whole number >= 1), got {text!r}")
    return int(k), path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint written by m2clip_fast.train or convert")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights (open_clip tag or local file) instead of the checkpoint's own source, "
                        "e.g. when its weights file has moved")
    p.add_argument("--views", type=views_arg, default=None,
                   help="CLIPSxCROPS: temporal clips x spatial crops (1, 3 or 4); default: the checkpoint's "
                        "train.views (the official test views for the k400/ssv2 presets; 1x1 if it has none)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4,
                   help="videos per step (each has CLIPS*CROPS views)")
    p.add_argument("--zero-shot", choices=("ucf101", "hmdb51"), default=None)
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="a transfer protocol on split files in ViFi-CLIP's format (see the README)")
    p.add_argument("--split-dir", default=None,
                   help="folder with the split files: the official UCF101/HMDB51 ones (--zero-shot), "
                        "ZS_splitN_K600_eval.txt (k600-zeroshot), base_val.txt and novel_val.txt (base-to-novel)")
    p.add_argument("--splits", type=splits_arg, default=[1, 2, 3], help="zero-shot splits, e.g. 1,2,3")
    p.add_argument("--labels-dir", default=None,
                   help="k600-zeroshot: folder with the label files ZS_splitN_K600.csv (default: --split-dir)")
    p.add_argument("--base-labels", default=None,
                   help="base-to-novel: the base classes' label file (default: SPLIT_DIR/base_labels.csv)")
    p.add_argument("--novel-labels", default=None,
                   help="base-to-novel: the novel classes' label file (default: SPLIT_DIR/novel_labels.csv)")
    p.add_argument("--shots", type=shot_checkpoint, nargs="+", default=None, metavar="K=CHECKPOINT",
                   help="few-shot: the checkpoint trained on each K-shot list, e.g. 2=a.pt 4=b.pt 8=c.pt 16=d.pt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), none, bf16, fp16")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="also write per-class accuracy, the confusion matrix (CSV, PNG) and per-video predictions "
                        "to DIR (zero-shot: DIR/split_N; base-to-novel: DIR/base, DIR/novel; few-shot: DIR/K_shot)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    add_data_args(p, train=False)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Which options each mode needs, before anything is read."""
    if args.zero_shot is not None and args.protocol is not None:
        p.error("--zero-shot is a protocol of its own: give it or --protocol")
    for option, protocol in (("labels_dir", "k600-zeroshot"), ("base_labels", "base-to-novel"),
                             ("novel_labels", "base-to-novel")):
        if getattr(args, option) is not None and args.protocol != protocol:
            p.error(f"--{option.replace('_', '-')} is for --protocol {protocol}")
    if args.class_names and args.protocol in ("k600-zeroshot", "base-to-novel"):
        p.error(f"--protocol {args.protocol} takes the class names from the split folder's label files, "
                f"not --class-names")
    if args.protocol == "few-shot":
        if not (args.shots and args.val_list) or args.checkpoint:
            p.error("--protocol few-shot takes --shots K=CHECKPOINT ... and the full test list --val-list "
                    "(no --checkpoint)")
        if len({k for k, _ in args.shots}) != len(args.shots):
            p.error("--shots names a K twice")
        return
    if args.shots:
        p.error("--shots is for --protocol few-shot")
    if not args.checkpoint:
        p.error("--checkpoint is required")
    on_splits = args.zero_shot or args.protocol
    if on_splits is None and not args.val_list:
        p.error("give --val-list, or --zero-shot / --protocol with --split-dir")
    if on_splits is not None and not (args.split_dir and args.data_root):
        p.error(f"{'--zero-shot' if args.zero_shot else '--protocol ' + args.protocol} needs --split-dir and "
                f"--data-root")
    if on_splits is not None and args.val_list:
        p.error("the split files of --split-dir are evaluated; --val-list would be ignored: give one of them")


class Scorer:
    """One checkpoint's model, placed on the device, and the scores of any list of samples with it."""

    def __init__(self, args: argparse.Namespace, checkpoint: str, info, device, decoder: DecoderChoice):
        self.args, self.info, self.device, self.decoder = args, info, device, decoder
        self.model, ckpt = load_model_checkpoint(Path(checkpoint), pretrained=args.pretrained,
                                                 trust=args.trust_checkpoint)
        self.amp_dtype = runtime.place_model(self.model, device, args.amp)
        train_cfg = ckpt["config"].get("train", {})
        self.workers = train_cfg.get("workers", 2) if args.workers is None else args.workers
        self.sampling, self.stride = train_cfg.get("sampling", "dense"), train_cfg.get("stride", 8)
        self.views = args.views or train_cfg.get("views") or "1x1"  # as the checkpoint's run validated

    def __call__(self, samples, report: Union[int, str, None] = None, class_names: Optional[Sequence[str]] = None,
                 templates: Optional[Sequence[str]] = None):
        """``(metrics, skipped)`` of ``samples`` (see :func:`m2clip_fast.evaluation.scores`), with the text head
        over ``class_names`` (default: the checkpoint's); ``report`` names the report's subfolder."""
        model, args = self.model, self.args
        loader = build_clip_loader(samples, train=False, decoder=self.decoder.name, device=self.device,
                                   views=self.views, batch_size=args.batch_size, workers=self.workers,
                                   num_frames=model.num_frames, size=model.crop_size, sampling=self.sampling, stride=self.stride, seed=0)
        decoding = DecodeTally(self.decoder.description)
        predictions, bad = collect_predictions(model, decoding.watch(loader), self.device, self.amp_dtype,
                                               class_names=class_names, templates=templates,
                                               progress=self.info.is_main)
        if args.report is not None and self.info.is_main:
            write_report(report_dir(args.report, report), predictions, [path for path, _ in samples],
                         class_names or model.class_names)
        metrics, skipped = scores(predictions, bad)
        return {**metrics, "decode_stats": decoding.record(runtime.all_gather_objects)}, skipped


def evaluate(args: argparse.Namespace) -> Dict[str, object]:
    """Scores of ``args.checkpoint``: every head's top-1/top-5 on ``--val-list``, the text head's zero-shot
    accuracy per split, or a transfer protocol's. Unreadable videos are left out of the accuracy, counted
    (``excluded``) and listed (``skipped``: path and reason). Every list is read and checked before a model
    is built, so that a bad split file is reported at once, not after the earlier splits have run."""
    info, device = runtime.init_distributed(args.device)
    decoder = resolve_decoder(args.decoder, device, runtime.all_gather_objects)  # once, for every checkpoint
    if info.is_main and decoder.notice:
        print(decoder.notice, file=sys.stderr)  # stdout may be --json
    if args.protocol == "few-shot":
        return _few_shot(args, info, device, decoder)
    if args.protocol == "base-to-novel":
        subsets = _base_to_novel_lists(args)
        return _base_to_novel(args, Scorer(args, args.checkpoint, info, device, decoder), subsets)
    if args.protocol == "k600-zeroshot":
        splits = _k600_splits(args)
        scorer = Scorer(args, args.checkpoint, info, device, decoder)
        result = _zero_shot(scorer, splits, ZERO_SHOT_TEMPLATES)
        return {"checkpoint": str(args.checkpoint), "views": scorer.views,
                "dataset": "kinetics600 (the 220 classes not in kinetics400)", **result}
    if args.zero_shot is not None:
        names = load_class_names(args.class_names or args.zero_shot)
        splits = {split: (names, *kept) for split, kept in _official_splits(args, names).items()}
        scorer = Scorer(args, args.checkpoint, info, device, decoder)
        result = _zero_shot(scorer, splits, ZERO_SHOT_TEMPLATES)
        return {"checkpoint": str(args.checkpoint), "views": scorer.views, "dataset": args.zero_shot, **result}
    names = load_class_names(args.class_names) if args.class_names else None
    scorer = Scorer(args, args.checkpoint, info, device, decoder)
    loaded = _validation_samples(args, _checkpoint_names(scorer, names))
    return {"checkpoint": str(args.checkpoint), "views": scorer.views, **_supervised(scorer, *loaded)}


def _checkpoint_names(scorer: Scorer, names: Optional[List[str]]) -> List[str]:
    """The class names supervised scoring labels ``--val-list`` by: ``names`` (``--class-names``), which must be
    the checkpoint's, or the checkpoint's own."""
    model_names = scorer.model.class_names
    names = names if names is not None else model_names
    if list(names) != model_names:
        raise UsageError(f"--class-names gives {len(names)} classes that differ from the checkpoint's "
                         f"{len(model_names)}; use --zero-shot for another label set")
    return names


def _supervised(scorer: Scorer, samples, dropped, report: Optional[str] = None) -> Dict[str, object]:
    """Every head on ``--val-list``'s ``samples`` (``dropped``: those left out when it was read)."""
    metrics, skipped = scorer(samples, report)
    return {**metrics, "dropped": len(dropped), "skipped": skipped}


def _validation_samples(args: argparse.Namespace, names: Sequence[str]) -> tuple:
    """``(samples, dropped)`` of ``--val-list`` labelled by ``names``, read and checked."""
    return load_samples(args.val_list, args.data_root, names, train=False, skip_missing=args.skip_missing,
                        what="validation list")


def _zero_shot(scorer: Scorer, splits: Dict[int, tuple], templates) -> Dict[str, object]:
    """The text head per split ``{split: (class names, samples, dropped)}``, then mean ± std over them."""
    per_split: List[Dict[str, object]] = []
    for split, (names, samples, dropped) in splits.items():
        metrics, skipped = scorer(samples, split, class_names=names, templates=templates)
        per_split.append({"split": split, "top1": metrics["top1_text"], "top5": metrics["top5_text"],
                          "num_classes": len(names), "num_samples": metrics["num_samples"],
                          "excluded": metrics["excluded"], "dropped": len(dropped), "skipped": skipped,
                          "decode_stats": metrics["decode_stats"]})
    return {"splits": per_split, **split_summary(per_split)}


def _official_splits(args: argparse.Namespace, names: List[str]) -> Dict[int, tuple]:
    """``{split: (samples, dropped)}`` of the official UCF101/HMDB51 test lists, every asked split read and
    checked."""
    splits = {}
    for split in args.splits:
        samples = read_split(args.zero_shot, args.split_dir, args.data_root, split, train=False,
                                    class_names=names)
        splits[split] = check_samples(samples, len(names), skip_missing=args.skip_missing,
                                      what=f"{args.zero_shot} split {split}", root=args.data_root)
    return splits


def _checked_split(args: argparse.Namespace, list_path: Path, labels_path: Path):
    """``(class names, samples, dropped)`` of a ViFi-CLIP video list and its label file."""
    names = read_labels_csv(labels_path)
    samples = read_split_list(list_path, args.data_root, len(names))
    kept, dropped = check_samples(samples, len(names), skip_missing=args.skip_missing, what=f"split file {list_path}",
                                  root=args.data_root)
    return names, kept, dropped


def _k600_splits(args: argparse.Namespace) -> Dict[int, tuple]:
    labels = Path(args.labels_dir or args.split_dir)
    return {n: _checked_split(args, Path(args.split_dir) / k600_list_name(n), labels / k600_labels_name(n))
            for n in args.splits}


def _base_to_novel_lists(args: argparse.Namespace) -> Dict[str, tuple]:
    split_dir = Path(args.split_dir)
    labels = {"base": args.base_labels or split_dir / "base_labels.csv",
              "novel": args.novel_labels or split_dir / "novel_labels.csv"}
    subsets = {subset: _checked_split(args, split_dir / f"{subset}_val.txt", Path(labels[subset]))
               for subset in ("base", "novel")}
    shared = set(subsets["base"][0]) & set(subsets["novel"][0])
    if shared:
        raise UsageError(f"the base and novel label files share {len(shared)} class(es), e.g. {sorted(shared)[0]!r}: "
                         f"novel classes are the ones the model was not trained on")
    return subsets


def _base_to_novel(args: argparse.Namespace, scorer: Scorer, subsets: Dict[str, tuple]) -> Dict[str, object]:
    """Base test videos over the base class names, novel ones over the novel names (the model's own
    templates), and their harmonic mean."""
    result: Dict[str, object] = {"checkpoint": str(args.checkpoint), "views": scorer.views}
    for subset, (names, samples, dropped) in subsets.items():
        metrics, skipped = scorer(samples, subset, class_names=names)
        result[subset] = {**metrics, "num_classes": len(names), "dropped": len(dropped), "skipped": skipped}
    return {**result, **base_to_novel_summary(result["base"], result["novel"])}


def _few_shot(args: argparse.Namespace, info, device, decoder: DecoderChoice) -> Dict[str, object]:
    """Each K's checkpoint on the full test list: every head, as supervised evaluation scores them."""
    names = load_class_names(args.class_names) if args.class_names else None
    rows, loaded = [], None
    for shots, checkpoint in sorted(args.shots):
        scorer = Scorer(args, checkpoint, info, device, decoder)
        names = _checkpoint_names(scorer, names)
        loaded = loaded or _validation_samples(args, names)  # one test list for every K: read it once
        row = _supervised(scorer, *loaded, report=f"{shots}_shot")
        rows.append({"shots": shots, "checkpoint": checkpoint, "views": scorer.views, **row})
    views = ", ".join(sorted({row["views"] for row in rows}))  # each checkpoint's own unless --views is given
    return {"val_list": args.val_list, "views": views, "shots": rows}


def _skipped_lines(skipped: List[Dict[str, str]], note: str) -> List[str]:
    return [f"  {note}:"] + [f"    {s['path']}: {s['reason']}" for s in skipped] if skipped else []


def _decode_lines(result: Dict[str, object]) -> List[str]:
    line = decode_stats_line(result["decode_stats"])
    return [f"  {line}"] if line else []


def format_result(result: Dict[str, object]) -> str:
    if "hm_top1" in result:
        lines = format_base_to_novel(result)
        for subset in ("base", "novel"):
            lines += _skipped_lines(result[subset]["skipped"], excluded_note(result[subset]))
        return "\n".join(lines)
    if "shots" in result:
        lines = format_few_shot(result)
        for row in result["shots"]:
            lines += _skipped_lines(row["skipped"], excluded_note(row))
        return "\n".join(lines)
    if "splits" in result:
        lines = [f"zero-shot {result['dataset']} ({result['views']} views):"]
        for s in result["splits"]:
            lines.append(f"  split {s['split']}: top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%  "
                         f"({s['num_classes']} classes, {s['num_samples']} videos)")
            lines += _skipped_lines(s["skipped"], excluded_note(s)) + _decode_lines(s)
        n = len(result["splits"])
        lines.append(f"  top-1 {result['top1_mean']:.2f} ± {result['top1_std']:.2f}%  "
                     f"top-5 {result['top5_mean']:.2f} ± {result['top5_std']:.2f}% over {n} splits")
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
