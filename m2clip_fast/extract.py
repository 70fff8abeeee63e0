"""``python -m m2clip_fast.extract``: video embeddings of every video of a list, in resumable safetensors shards.

``--list F --data-root D --out DIR --checkpoint C [--views 4x3] [--per-frame] [--shard i/N]``. The list's rows
are cut into parts of ``--part-size`` rows; part k is ``DIR/part-KKKKK-of-PPPPP.safetensors`` with

* ``row`` int64 (n,): the list row of each entry; ``valid`` uint8 (n,): 0 for a video that could not be read;
* ``video`` float32 (n, D): ``encode_video`` averaged over the CLIPSxCROPS views (evaluation averages its views'
  probabilities the same way); NaN for an unreadable video;
* with ``--per-frame``: ``frames`` float32 (n, V, T, D), the per-frame embeddings of every view, and the class
  logits of every view, ``logits_text`` (n, V, C) (CLIP-scaled cosine to the class texts) and ``logits_vc``
  (n, V, C) (the linear head);

and ``DIR/part-KKKKK-of-PPPPP.csv`` its rows (``row, path, label, views, status``: ``ok`` or the reason the video
was unreadable). Once every part exists, ``DIR/index.csv`` joins them. ``--shard i/N`` (i from 0) takes the i-th of
N equal runs of parts, so the N jobs of a cluster array split a dataset between them. A part is written under a
temporary name and renamed when complete: a rerun keeps finished parts and redoes a missing or unreadable one.
``DIR/extract.json`` records the settings (every part's safetensors metadata repeats them); a rerun with other
settings into the same DIR is refused.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .cli import ANNOTATION_HELP, int_at_least, run_main, shard_arg, views_arg
from .data.datasets import DatasetError, read_annotations
from .data.loader import parse_views
from .errors import UsageError
from .runtime import autocast
from .inputs import Clip, VideoViews, clip_sampling, views_loader
from .predict import add_model_args, load_model

PROG = "python -m m2clip_fast.extract"
INDEX_FIELDS = ("row", "path", "label", "views", "status")


# ----------------------------------------------------------------------------------------------- parts


def part_ranges(rows: int, part_size: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` row ranges of the parts: ``part_size`` rows each, the last one the rest."""
    return [(s, min(s + part_size, rows)) for s in range(0, rows, part_size)]


def shard_parts(parts: int, shard: Tuple[int, int]) -> range:
    """The part numbers shard ``i`` of ``N`` writes: the i-th of N contiguous, near-equal runs."""
    i, n = shard
    return range(i * parts // n, (i + 1) * parts // n)


def part_name(k: int, parts: int) -> str:
    return f"part-{k:05d}-of-{parts:05d}"


def part_done(out: Path, k: int, parts: int) -> bool:
    """A finished part: its index CSV and a safetensors file whose header reads."""
    from safetensors import safe_open

    name = part_name(k, parts)
    if not (out / f"{name}.csv").is_file() or not (out / f"{name}.safetensors").is_file():
        return False
    try:
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            return "video" in f.keys()
    except Exception:  # noqa: BLE001 - a torn or foreign file: redo the part
        return False


def _replace_from_temp(path: Path, write) -> None:
    """``write(temporary path)``, then rename it to ``path``: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    _replace_from_temp(path, write)


def write_part(out: Path, k: int, parts: int, tensors: Dict[str, torch.Tensor], rows: Sequence[Dict[str, Any]],
               metadata: Dict[str, str]) -> None:
    """The part's CSV first, its safetensors file last: the safetensors file's presence marks the part done."""
    from safetensors.torch import save_file

    name = part_name(k, parts)
    _write_csv(out / f"{name}.csv", rows)
    _replace_from_temp(out / f"{name}.safetensors",
                       lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata))


def join_index(out: Path, parts: int) -> Optional[Path]:
    """``DIR/index.csv`` of every part's rows, once every part is done; None while some are missing."""
    if not all(part_done(out, k, parts) for k in range(parts)):
        return None
    rows = []
    for k in range(parts):
        with open(out / f"{part_name(k, parts)}.csv", encoding="utf-8", newline="") as f:
            rows.extend(csv.DictReader(f))
    _write_csv(out / "index.csv", rows)
    return out / "index.csv"


def claim_settings(out: Path, settings: Dict[str, Any]) -> None:
    """Record ``settings`` in ``DIR/extract.json``, or check them against what an earlier or concurrent job
    recorded there (the first to link its file wins)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "extract.json"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".extract.json.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
        try:
            os.link(tmp, path)  # fails if another job got there first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    recorded = json.loads(path.read_text(encoding="utf-8"))
    differ = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
    if differ:
        raise UsageError(f"{out} holds an extraction with other settings ({', '.join(differ)}: "
                         f"{[recorded.get(k) for k in differ]} there, {[settings.get(k) for k in differ]} now); "
                         f"use another --out or delete it")


# ----------------------------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed_views(model, video: torch.Tensor, device, amp_dtype, per_frame: bool) -> Dict[str, torch.Tensor]:
    """float32 (B, V, T, 3, S, S) views → ``{"video": (B, D)}`` (the mean over views of ``encode_video``), with
    ``per_frame`` also ``"frames"`` (B, V, T, D), ``"logits_text"`` and ``"logits_vc"`` (B, V, C). On the CPU."""
    b, v = video.shape[:2]
    with autocast(device, amp_dtype):
        frames, pooled = model.encode_frames_for_inference(video.to(device).flatten(0, 1))
        out = {"video": frames.float().mean(dim=1).reshape(b, v, -1).mean(dim=1)}
        if per_frame:
            out["frames"] = frames.float().reshape(b, v, *frames.shape[1:])
            logits_text = model._similarity_logits(frames.mean(dim=1), model.encode_text())
            out["logits_text"] = logits_text.float().reshape(b, v, -1)
            out["logits_vc"] = model.vc_head(pooled).float().reshape(b, v, -1)
    return {name: t.cpu() for name, t in out.items()}


def row_shapes(model, per_frame: bool, num_views: int) -> Dict[str, Tuple[int, ...]]:
    """The shape of one row of each embedding tensor (see the module docstring)."""
    dim = model.encode_text().shape[-1]
    shapes = {"video": (dim,)}
    if per_frame:
        shapes.update(frames=(num_views, model.num_frames, dim), logits_text=(num_views, model.num_classes),
                      logits_vc=(num_views, model.num_classes))
    return shapes


def extract_part(model, dataset: VideoViews, rows: range, shapes: Dict[str, Tuple[int, ...]], args, device,
                 amp_dtype) -> Tuple[Dict[str, torch.Tensor], Dict[int, str]]:
    """``(tensors, status)`` of list rows ``rows``: the tensors of the module docstring (NaN rows for unreadable
    videos) and, per row, ``"ok"`` or the reason its video could not be read."""
    from torch.utils.data import Subset

    tensors = {name: torch.full((len(rows), *shape), float("nan")) for name, shape in shapes.items()}
    valid = torch.zeros(len(rows), dtype=torch.uint8)
    status: Dict[int, str] = {}
    # Subset's items keep the dataset's own index (the list row), so batch["index"] names rows directly
    for batch in views_loader(Subset(dataset, list(rows)), args.batch_size, args.workers):
        status.update(batch["failed"])
        if batch["video"] is not None:
            out = embed_views(model, batch["video"], device, amp_dtype, args.per_frame)
            at = batch["index"] - rows.start
            for name, t in out.items():
                tensors[name][at] = t
            valid[at] = 1
            status.update((i, "ok") for i in batch["index"].tolist())
    tensors.update(row=torch.arange(rows.start, rows.stop, dtype=torch.int64), valid=valid)
    return tensors, status


# ----------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--list", required=True, help=f"the videos: {ANNOTATION_HELP}")
    p.add_argument("--data-root", default=None, help="the folder the list's paths are relative to (default: the "
                                                     "list's own folder)")
    p.add_argument("--out", required=True, help="output folder DIR")
    add_model_args(p)
    p.add_argument("--class-names", default=None,
                   help="class-name file for the list's labels (default: the model's classes)")
    p.add_argument("--views", type=views_arg, default="1x1", help="CLIPSxCROPS views per video, e.g. 4x3")
    p.add_argument("--per-frame", action="store_true", help="also per-frame embeddings and class logits per view")
    p.add_argument("--shard", type=shard_arg, default=(0, 1), help="i/N: this job's share of the parts (i from 0)")
    p.add_argument("--part-size", type=int_at_least(1), default=1024, help="rows per safetensors part")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="videos per step")
    p.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader decoding workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace, rows: int) -> Dict[str, Any]:
    """What must agree between the jobs (and reruns) writing one DIR."""
    model = os.path.abspath(args.checkpoint) if args.checkpoint else f"preset:{args.preset}"
    return {"model": model, "pretrained": args.pretrained, "list": os.path.abspath(args.list),
            "data_root": os.path.abspath(args.data_root) if args.data_root else None, "rows": rows,
            "views": args.views, "per_frame": args.per_frame, "part_size": args.part_size}


def extract(args: argparse.Namespace) -> Dict[str, Any]:
    """Write this shard's missing parts; returns counts and the unreadable videos it met."""
    from tqdm import tqdm

    from .text import load_class_names

    classes = load_class_names(args.class_names) if args.class_names else None
    model, train_config, _, device, amp_dtype = load_model(args, classes, "--class-names")
    samples = read_annotations(args.list, args.data_root, classes or model.class_names, train=False)
    if not samples:
        raise DatasetError(f"{args.list} lists no videos")
    out = Path(args.out)
    settings = settings_of(args, len(samples))
    claim_settings(out, settings)
    ranges = part_ranges(len(samples), args.part_size)
    mine = shard_parts(len(ranges), args.shard)
    todo = [k for k in mine if not part_done(out, k, len(ranges))]
    sampling, stride = clip_sampling(train_config)
    views = parse_views(args.views)
    dataset = VideoViews([Clip(p) for p, _ in samples], num_frames=model.num_frames, size=model.crop_size,
                         sampling=sampling, stride=stride, num_clips=views[0], num_crops=views[1])
    shapes = row_shapes(model, args.per_frame, views[0] * views[1])
    unreadable: List[Dict[str, str]] = []
    for k in tqdm(todo, desc="extract", unit="part", file=sys.stderr, disable=args.no_progress or None):
        rows = range(*ranges[k])
        tensors, status = extract_part(model, dataset, rows, shapes, args, device, amp_dtype)
        index = [{"row": i, "path": samples[i][0], "label": samples[i][1], "views": args.views,
                  "status": status[i]} for i in rows]
        write_part(out, k, len(ranges), tensors, index, {key: str(value) for key, value in settings.items()})
        unreadable += [{"path": r["path"], "reason": r["status"]} for r in index if r["status"] != "ok"]
    index_path = join_index(out, len(ranges))
    return {"parts": len(ranges), "shard_parts": len(mine), "written": len(todo), "kept": len(mine) - len(todo),
            "unreadable": unreadable, "index": str(index_path) if index_path else None}


def main(argv: Optional[List[str]] = None) -> int:
    def run() -> int:
        args = parse_args(argv)
        result = extract(args)
        for s in result["unreadable"]:
            print(f"unreadable {s['path']}: {s['reason']}", file=sys.stderr)
        print(f"shard {args.shard[0]}/{args.shard[1]}: {result['shard_parts']} of {result['parts']} parts, "
              f"{result['written']} written, {result['kept']} already done, {len(result['unreadable'])} unreadable "
              f"videos; " + (f"index {result['index']}" if result["index"] else "other shards' parts still missing"))
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
