"""``python -m m2clip_fast.predict``: class predictions for your own videos.

``python -m m2clip_fast.predict INPUT... --checkpoint F`` prints the top-k classes of every video with their
probabilities, per head (vc, text and their average, fused); ``--classes`` any class list (a shipped list name, a
file with one name per line, or "a,b,c") predicts zero-shot with the text head and a prompt ensemble, as
``evaluate --zero-shot`` does. ``--window SECONDS`` slides over whole long videos instead (see
:mod:`m2clip_fast.windows`). INPUT: video files, folders (searched recursively), glob patterns, list files.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import runtime
from .checkpoint import TRUST_HELP, load_model_checkpoint
from .cli import int_at_least, run_main, views_arg
from .data.loader import parse_views
from .data.robust import SAMPLE_ERRORS, skip_reason
from .errors import UsageError
from .evaluation import view_probabilities
from .inputs import Clip, VideoViews, clip_sampling, collect_videos, views_loader
from .text import SHIPPED_CLASS_LISTS, ZERO_SHOT_TEMPLATES, load_class_names
from .windows import annotate_video, output_names, timeline_png, window_row, windows_of, write_jsonl

PROG = "python -m m2clip_fast.predict"
HEAD_ORDER = ("fused", "vc", "text")


# ----------------------------------------------------------------------------------------------- model


def parse_classes(text: str) -> List[str]:
    """``--classes``: a shipped list name, a class-name file, or names separated by commas."""
    if text in SHIPPED_CLASS_LISTS or Path(text).is_file():
        return load_class_names(text)
    if "," in text:
        return load_class_names([n for n in text.split(",") if n.strip()])
    raise UsageError(f"--classes {text!r} is neither a shipped list ({', '.join(SHIPPED_CLASS_LISTS)}), "
                            f"nor a file, nor a comma-separated list of names")


class Predictor:
    """A model with the class list and prompt templates it predicts over, and how it samples frames.

    ``supervised`` (a checkpoint's own classes): the vc, text and fused heads; otherwise the text head alone
    (zero-shot: there is no trained linear head for other classes)."""

    def __init__(self, model, class_names: Optional[List[str]], templates: Optional[Sequence[str]],
                 train_config: Dict[str, Any], supervised: bool, device: torch.device, amp_dtype):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.supervised = supervised
        self.class_names = list(model.class_names) if class_names is None else class_names
        self.templates = templates
        self.sampling, self.stride = clip_sampling(train_config)
        self.heads = ("fused", "vc", "text") if supervised else ("text",)

    @torch.no_grad()
    def probabilities(self, video: torch.Tensor) -> Dict[str, torch.Tensor]:
        """float32 (B, V, T, 3, S, S) views → ``{head: float32 (B, C)}``, class probabilities averaged over the
        V views (as evaluation averages them)."""
        return view_probabilities(self.model, video, self.device, self.amp_dtype,
                                  None if self.supervised else self.class_names, self.templates, self.heads)

    def dataset(self, clips: Sequence[Clip], views: str) -> VideoViews:
        num_clips, num_crops = parse_views(views)
        return VideoViews(clips, num_frames=self.model.num_frames, size=self.model.crop_size,
                          sampling=self.sampling, stride=self.stride, num_clips=num_clips, num_crops=num_crops)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint | --preset, --pretrained, --device, --amp: where the model comes from and where it runs."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by m2clip_fast.train or convert")
    src.add_argument("--preset", help="a model preset (zero-shot over --classes; its adapters untrained)")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights (open_clip tag or file): for --preset, or instead of a checkpoint's own")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), none, bf16, fp16")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)


def load_model(args: argparse.Namespace, classes: Optional[List[str]], classes_option: str = "--classes"):
    """``(model in eval mode on --device, its training config, whether it came from a checkpoint, device, amp
    dtype)``. A preset's model is built over ``classes`` (needed when the preset has no class list)."""
    _, device = runtime.init_distributed(args.device)
    if args.checkpoint:
        model, ckpt = load_model_checkpoint(Path(args.checkpoint), pretrained=args.pretrained,
                                            trust=args.trust_checkpoint)
        train_config = ckpt["config"].get("train", {})
    else:
        from .model import create_model
        from .presets import resolve_config

        config = resolve_config(args.preset)
        if classes is None and config.class_names is None:
            raise UsageError(f"preset {args.preset} has no class list: give {classes_option}")
        model = create_model(config, pretrained=args.pretrained, class_names=classes)
        train_config = config.train
    amp_dtype = runtime.place_model(model, device, args.amp)
    model.eval()
    return model, train_config, bool(args.checkpoint), device, amp_dtype


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The model of ``--checkpoint`` (or ``--preset`` with ``--pretrained``) with the classes and templates it
    predicts over: a checkpoint's own classes with every head, else (other classes, or a preset, whose linear
    head is untrained) the text head alone."""
    classes = parse_classes(args.classes) if args.classes else None
    model, train_config, trained, device, amp_dtype = load_model(args, classes)
    supervised = trained and (classes is None or classes == model.class_names)
    templates = args.templates or (None if supervised else ZERO_SHOT_TEMPLATES)
    return Predictor(model, None if supervised else list(model.class_names if classes is None else classes),
                     templates, train_config, supervised, device, amp_dtype)


# ----------------------------------------------------------------------------------------------- running


def run_clips(predictor: Predictor, clips: Sequence[Clip], views: str, batch_size: int, workers: int,
              progress: bool = True) -> Iterator[Tuple[int, Optional[Dict[str, torch.Tensor]], Optional[str]]]:
    """``(clip number, {head: (C,) probabilities} or None, None or the reason it could not be read)`` for every
    clip, in batches decoded by ``workers`` DataLoader workers (in clip order)."""
    from tqdm import tqdm

    loader = views_loader(predictor.dataset(clips, views), batch_size, workers)
    for batch in tqdm(loader, desc="predict", file=sys.stderr, disable=not progress or None, leave=False,
                      dynamic_ncols=True):
        for i, reason in batch["failed"]:
            yield i, None, reason
        if batch["video"] is not None:
            probs = predictor.probabilities(batch["video"])
            for row, i in enumerate(batch["index"].tolist()):
                yield i, {h: p[row] for h, p in probs.items()}, None


def top_k(probs: Dict[str, torch.Tensor], class_names: Sequence[str], k: int) -> Dict[str, List[Dict[str, Any]]]:
    """``{head: [{"label", "score"}, ...]}``, the ``k`` most probable classes of each head, best first."""
    out = {}
    for head in HEAD_ORDER:
        if head in probs:
            values, indices = probs[head].topk(min(k, probs[head].numel()))
            out[head] = [{"label": class_names[i], "score": float(v)} for v, i in zip(values.tolist(),
                                                                                      indices.tolist())]
    return out


# ----------------------------------------------------------------------------------------------- output


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One block per row: the file (and time range of a window), then one line per head."""
    lines = []
    for row in rows:
        where = f"  [{row['start']:.2f}-{row['end']:.2f}s]" if "start" in row else ""
        lines.append(f"{row['file']}{where}")
        for head, preds in row["predictions"].items():
            best = "  ".join(f"{p['label']} {100 * p['score']:.1f}%" for p in preds)
            lines.append(f"  {head:<6} {best}")
    return "\n".join(lines)


CSV_FIELDS = ("file", "start", "end", "head", "rank", "label", "score")


def write_rows(rows: Sequence[Dict[str, Any]], json_out: Optional[str], csv_out: Optional[str]) -> None:
    """``--json OUT``: one JSON list of rows; ``--csv OUT``: one line per (row, head, rank). ``-`` is stdout."""
    if json_out:
        _write_text(json_out, json.dumps(list(rows), indent=1) + "\n")
    if csv_out:
        with _open_out(csv_out) as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                for head, preds in row["predictions"].items():
                    for rank, p in enumerate(preds, 1):
                        writer.writerow({"file": row["file"], "start": row.get("start", ""),
                                         "end": row.get("end", ""), "head": head, "rank": rank,
                                         "label": p["label"], "score": f"{p['score']:.6f}"})


class _Stdout:
    def __enter__(self):
        return sys.stdout

    def __exit__(self, *exc):
        sys.stdout.flush()


def _open_out(path: str):
    return _Stdout() if path == "-" else open(path, "w", encoding="utf-8", newline="")


def _write_text(path: str, text: str) -> None:
    with _open_out(path) as f:
        f.write(text)


def report_failures(failed: Sequence[Tuple[str, str]]) -> None:
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders (recursively), glob patterns, or list files (@F, F.txt: a path a line)")
    add_model_args(p)
    p.add_argument("--classes", default=None,
                   help="predict over these classes (zero-shot): a shipped list (kinetics400, ssv2, ucf101, hmdb51), "
                        "a file with one name per line, or 'a,b,c'; default: the checkpoint's classes")
    p.add_argument("--templates", nargs="+", default=None,
                   help="prompt templates with {} for the class name; default: the checkpoint's own, or for "
                        "other classes the zero-shot ensemble of evaluate --zero-shot")
    p.add_argument("--top-k", type=int_at_least(1), default=5)
    p.add_argument("--views", type=views_arg, default="1x1", help="CLIPSxCROPS per video (or window)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="videos (or windows) per step")
    p.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader decoding workers")
    p.add_argument("--json", metavar="OUT", default=None, help="write the predictions as JSON (- for stdout)")
    p.add_argument("--csv", metavar="OUT", default=None, help="write the predictions as CSV (- for stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    w = p.add_argument_group("long videos")
    w.add_argument("--window", type=_seconds, default=None, metavar="SECONDS",
                   help="slide a window of this length over each whole video")
    w.add_argument("--stride", type=_seconds, default=None, metavar="SECONDS",
                   help="window step (default: the window length; at most the window length)")
    w.add_argument("--out-dir", default="predictions",
                   help="with --window: where NAME.windows.jsonl and NAME.timeline.png go")
    w.add_argument("--annotate", metavar="OUT.mp4", default=None,
                   help="with --window and one video: a copy of it with the current top label drawn on each frame")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.window is None and (args.stride is not None or args.annotate):
        p.error("--stride and --annotate need --window")
    if args.window is not None and args.stride is not None and args.stride > args.window:
        p.error(f"--stride {args.stride} is longer than --window {args.window}: windows would leave gaps")
    if args.json == "-" and args.csv == "-":
        p.error("--json - and --csv - would both write to stdout")
    return args


def predict_files(args: argparse.Namespace) -> int:
    """Whole-video predictions of every input: the table on stdout (or --json/--csv). Exit status 0 when at
    least one video was predicted, 1 when none could be."""
    paths = collect_videos(args.inputs)
    predictor = load_predictor(args)
    rows: Dict[int, Dict[str, Any]] = {}
    failed: List[Tuple[str, str]] = []
    for i, probs, reason in run_clips(predictor, [Clip(p) for p in paths], args.views, args.batch_size,
                                      args.workers, progress=not args.no_progress):
        if probs is None:
            failed.append((paths[i], reason))
        else:
            rows[i] = {"file": paths[i], "predictions": top_k(probs, predictor.class_names, args.top_k)}
    ordered = [rows[i] for i in sorted(rows)]
    report_failures(failed)
    write_rows(ordered, args.json, args.csv)
    if "-" not in (args.json, args.csv) and ordered:
        print(format_table(ordered))
    print(f"{len(ordered)} of {len(paths)} videos predicted" + (f", {len(failed)} skipped" if failed else ""),
          file=sys.stderr)
    return 0 if ordered else 1


def predict_windows(args: argparse.Namespace) -> int:
    """``predict --window``: per video, ``OUT_DIR/NAME.windows.jsonl`` (one row per window, with start/end in
    seconds and frames) and ``OUT_DIR/NAME.timeline.png``; ``--annotate``: the labelled copy. Exit 0 when at
    least one video was predicted, 1 when none could be."""
    paths = collect_videos(args.inputs)
    if args.annotate and len(paths) != 1:
        raise UsageError(f"--annotate writes one video, but the inputs hold {len(paths)}")
    predictor = load_predictor(args)
    clips, owner, rates, failed = [], [], {}, []
    for n, path in enumerate(paths):
        try:
            windows, rates[n] = windows_of(path, args.window, args.stride or args.window)
        except SAMPLE_ERRORS as exc:  # an unreadable video is reported and skipped
            failed.append((path, skip_reason(exc)))
            continue
        clips += windows
        owner += [n] * len(windows)
    per_video: Dict[int, List[Tuple[int, Dict[str, Any]]]] = {}
    bad: Dict[int, List[str]] = {}
    for i, probs, reason in run_clips(predictor, clips, args.views, args.batch_size, args.workers,
                                      progress=not args.no_progress):
        if probs is None:
            bad.setdefault(owner[i], []).append(reason)
        else:
            per_video.setdefault(owner[i], []).append((i, probs))
    for n, reasons in bad.items():  # the readable windows of such a video are still written
        failed.append((paths[n], f"{len(reasons)} of {owner.count(n)} windows unreadable: {reasons[0]}"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for n, name in enumerate(output_names(paths)):
        if n not in per_video:
            continue
        windows = sorted(per_video[n], key=lambda item: item[0])
        rows = [window_row(clips[i], rates[n], top_k(p, predictor.class_names, args.top_k)) for i, p in windows]
        write_jsonl(out_dir / f"{name}.windows.jsonl", rows)
        head = predictor.heads[0]
        probs = np.stack([p[head].numpy() for _, p in windows])
        timeline_png(out_dir / f"{name}.timeline.png", rows, probs, predictor.class_names, head, paths[n])
        if args.annotate:
            annotate_video(paths[n], args.annotate, rows, head)
        all_rows += rows
        print(f"{paths[n]}: {len(rows)} windows -> {out_dir / name}.windows.jsonl, .timeline.png", file=sys.stderr)
    report_failures(failed)
    write_rows(all_rows, args.json, args.csv)
    if "-" not in (args.json, args.csv) and all_rows:
        print(format_table(all_rows))
    return 0 if all_rows else 1


def main(argv: Optional[List[str]] = None) -> int:
    def run() -> int:
        args = parse_args(argv)
        if args.window is not None:
            return predict_windows(args)
        return predict_files(args)

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
