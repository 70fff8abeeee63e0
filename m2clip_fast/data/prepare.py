"""``python -m m2clip_fast.data.prepare``: a re-encoded copy of a dataset that seeks cheaply.

``--list F [--data-root D] --out DIR [--short-side 256] [--keyint 16] [--crf 23] [--workers N] [--shard i/N]``
re-encodes every video of an annotation file to H.264 (libx264, yuv420p) in mp4, like mmaction2's
``resize_videos.py --dense``: the short side scaled down to ``--short-side`` (aspect kept, even sizes, never
upscaled), a keyframe every ``--keyint`` frames (no scene-cut keyframes), audio dropped. Frame ``i`` of the copy
is frame ``i`` of a plain decode of the source (:func:`~.decode.iter_frames`), resized: the copy is written with
``pts = i`` in a time base of one frame at the source's average rate, so no frame is dropped or duplicated, even
for a variable-rate source. No B-frames: libx264 declares frame reordering in the stream whenever B-frames are
allowed, yet its adaptive placement may use none in a clip, and an mp4 whose pts then follow decode order
although the codec says it reorders is one :func:`~.decode.decode_frames` cannot show exact (it decodes it
through); without B-frames every copy is served by the sparse fast path (and decodes with no reorder delay).
Each copy's packet index is checked (exact, with the source's frame count) before it is renamed into place.

Why: sparse decoding costs about one keyframe interval per clip, and Kinetics' YouTube videos have keyframes
every ~250 frames; at 16 a clip of 8 uniformly sampled frames decodes a small part of the video.

The copies go to ``DIR/<path relative to the data root>`` with the suffix ``.mp4``; the new annotation file(s),
pointing at them relative to ``DIR`` (so ``--data-root DIR`` reads them), are written once every video is done:
an mmaction2 list as ``DIR/<name>`` and a Kinetics CSV as ``DIR/<name>.csv`` (same format, rows of unreadable
videos left out); an SSv2 JSON and UCF101 / HMDB51 split files, awkward to rewrite, become mmaction2 lists
(``relative/path label``, labels as the readers number them): ``DIR/<stem>_list.txt``, and for HMDB51
``DIR/hmdb51_split<N>_train_list.txt`` and ``..._test_list.txt``.

Resumable: each shard appends one JSON line per finished video to ``DIR/_prepare/<list>.manifest-<i>-of-<N>.jsonl``
(the copy, its frame count and size, or the reason a source is unreadable) after the copy is renamed into place
from a temporary name; a rerun skips the videos recorded there whose copy is still whole, and redoes the rest.
``--shard i/N`` takes every N-th video from the i-th (for job arrays); ``python -m m2clip_fast.data.prepare merge
--out DIR`` then writes the lists of every list prepared in DIR from its shards' manifests (a run without
``--shard`` does it itself). Unreadable sources are listed in ``DIR/<list>.unreadable.jsonl`` and left out of
the lists. Several lists may share one DIR (train and val under one ``--data-root``) when they are encoded
alike; ``DIR/_prepare/<list>.json`` records each one's settings. Two runs must not prepare the same video at
once (the shards of one list never do).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import av

from ..errors import UsageError
from .datasets import (DatasetError, Sample, annotation_root, official_split, read_class_names, read_kinetics_csv,
                       read_list_file, read_split_file, read_ssv2_json)
from .decode import VideoDecodeError, get_index, iter_frames

__all__ = ["Settings", "list_groups", "copy_path", "output_size", "prepare_video", "merge", "main"]

PROG = "python -m m2clip_fast.data.prepare"
STATE_DIR = "_prepare"
MAX_CRF = 51
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
ENCODING = ("short_side", "keyint", "crf", "preset")  # what every copy in one DIR shares
DEFAULT_RATE = Fraction(25)  # a stream that states no rate at all


@dataclass(frozen=True)
class Settings:
    """What a prepared folder was made from; a run with other settings into the same folder is refused."""

    list: str
    data_root: str
    short_side: int
    keyint: int
    crf: int
    preset: str
    shards: int
    class_names: Optional[str] = None


# ------------------------------------------------------------------------------------------------ lists


def list_groups(path: str, root: str, class_names: Optional[str] = None) -> List[Tuple[str, List[Sample]]]:
    """``[(output list name, samples)]`` of an annotation file: one group, or HMDB51's train and test videos.
    The labels of the lists rewritten as mmaction2 lists come from ``class_names`` (a class-name file) where
    given, else as each reader numbers them alone (SSv2: the file's own sorted templates; UCF101: classInd.txt;
    HMDB51: the sorted class names)."""
    names = read_class_names(class_names) if class_names is not None else None
    name = Path(path).name
    split = official_split(path)
    if split is not None and split[0] == "hmdb51":
        return [(f"hmdb51_split{split[1]}_{part}_list.txt",
                 read_split_file(path, root, train=part == "train", class_names=names)) for part in ("train", "test")]
    if split is not None:
        return [(f"{Path(path).stem}_list.txt", read_split_file(path, root, train=True, class_names=names))]
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return [(name, read_kinetics_csv(path, root))]  # rewritten as a CSV: its labels stay names
    if suffix == ".json":
        labels = None if names is None else {n: i for i, n in enumerate(names)}
        return [(f"{Path(path).stem}_list.txt", read_ssv2_json(path, root, labels))]
    return [(name, read_list_file(path, root))]


def relative_source(video: str, root: str) -> str:
    """A listed video's path relative to the data root; one outside it cannot be placed under DIR."""
    rel = os.path.relpath(video, root)
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise DatasetError(f"{video} is outside the data root {root}: its copy would leave --out")
    return rel


def copy_path(rel: str) -> str:
    """The copy of a source, relative to DIR: the same path with the suffix .mp4."""
    return str(Path(rel).with_suffix(".mp4"))


def unique_videos(groups: List[Tuple[str, List[Sample]]], root: str) -> List[str]:
    """Every video of the groups once, in list order (relative to the root); two sources with one copy name
    (a.avi and a.mkv) are refused."""
    seen: Dict[str, str] = {}
    for _, samples in groups:
        for video, _ in samples:
            rel = relative_source(video, root)
            other = seen.setdefault(copy_path(rel), rel)
            if other != rel:
                raise DatasetError(f"{other} and {rel} would both be copied to {copy_path(rel)}")
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ one video


def output_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """``(width, height)`` of the copy: the short side scaled to ``short_side`` (never up), the aspect kept,
    both rounded to even numbers (yuv420p)."""
    scale = min(1.0, short_side / min(width, height))

    def even(x: float) -> int:
        return max(2, 2 * int(round(x * scale / 2)))

    return even(width), even(height)


def _frame_rate(path: str) -> Fraction:
    """The video stream's average rate as the container states it. Read from the header alone: whether the
    file is readable is for the decode to say (a demux error late in a file that decodes is no reason here)."""
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
    except (av.FFmpegError, OSError, IndexError):
        return DEFAULT_RATE
    return Fraction(rate) if rate and rate > 0 else DEFAULT_RATE


def _encode(src: str, tmp: str, settings: Settings, threads: int) -> int:
    """Write the copy of ``src`` to ``tmp``; returns its frame count. Raises VideoDecodeError for the source."""
    frames = iter_frames(src, threads=threads)
    first = next(frames)  # raises for an unreadable source before anything is written
    rate = _frame_rate(src)
    width, height = output_size(first.width, first.height, settings.short_side)
    count = 0
    with av.open(tmp, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / rate  # one tick per frame: pts = i keeps every frame
        stream.codec_context.thread_count = threads
        k = settings.keyint
        stream.options = {"crf": str(settings.crf), "preset": settings.preset,
                          "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0:bframes=0"}
        for frame in _chain(first, frames):
            image = frame.reformat(width, height, format="yuv420p", interpolation="AREA")
            image.pts, image.time_base = count, stream.codec_context.time_base
            image.pict_type = av.video.frame.PictureType.NONE  # the encoder places keyframes, not the source
            out.mux(stream.encode(image))
            count += 1
        out.mux(stream.encode(None))
    return count


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


class NotExactCopy(Exception):
    """A copy whose packet index does not admit the fast path or lacks frames."""


def _verify(tmp: str, frames: int) -> None:
    """The copy must be served by the sparse fast path and hold every frame (its packet index, no decode)."""
    index = get_index(tmp)
    if not index.exact or index.num_frames != frames:
        raise NotExactCopy(f"prepared copy {tmp} is not exact ({index.inexact_reason or 'frame count'}: "
                           f"{index.num_frames} of {frames} frames)")


def prepare_video(rel: str, settings: Settings, out_dir: str, threads: int = 0) -> Dict[str, Any]:
    """Prepare one video (``rel`` relative to the data root); the manifest entry. Never raises for a bad source."""
    src = os.path.join(settings.data_root, rel)
    dst = os.path.join(out_dir, copy_path(rel))
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    for stale in Path(dst).parent.glob(f".{Path(dst).name}.*.tmp.mp4"):  # left by a killed run
        _remove(str(stale))
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.tmp.mp4")
    try:
        frames = _encode(src, tmp, settings, threads)
        _verify(tmp, frames)
    except VideoDecodeError as exc:
        _remove(tmp)
        return {"source": rel, "status": "unreadable", "reason": exc.reason}
    except NotExactCopy as exc:  # never seen; left out and listed rather than ending a long run
        _remove(tmp)
        return {"source": rel, "status": "failed", "reason": str(exc)}
    os.replace(tmp, dst)
    return {"source": rel, "status": "done", "copy": copy_path(rel), "frames": frames,
            "bytes": os.path.getsize(dst)}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------ manifests


def state_dir(out_dir: Path) -> Path:
    """Where DIR keeps each list's settings and shard manifests (several lists may share one DIR)."""
    return out_dir / STATE_DIR


def manifest_path(out_dir: Path, list_name: str, shard: Tuple[int, int]) -> Path:
    return state_dir(out_dir) / f"{list_name}.manifest-{shard[0]}-of-{shard[1]}.jsonl"


def load_manifest(path: Path, out_dir: Path) -> Dict[str, Dict[str, Any]]:
    """The entries of a manifest whose outcome still holds, by source: a copy that is still there with its
    recorded size, or an unreadable source. A line torn by a kill is dropped (and cut from the file)."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    entries, kept = {}, []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or "source" not in entry:
            continue
        kept.append(line)
        if entry["status"] != "done" or _whole(out_dir / entry["copy"], entry["bytes"]):
            entries[entry["source"]] = entry
    if len(kept) != len(lines) or (lines and not text.endswith("\n")):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return entries


def _whole(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    # a per-process temporary name: the shards of a job array may write the same file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _settings_check(out_dir: Path, settings: Settings) -> None:
    """Record the settings of this list in DIR, or refuse: this list prepared there with other settings, or
    another list's copies there encoded otherwise."""
    mine = asdict(settings)
    name = Path(settings.list).name
    for path in sorted(state_dir(out_dir).glob("*.json")):
        theirs = json.loads(path.read_text(encoding="utf-8"))
        keys = mine if path.stem == name else ENCODING
        differ = {k: (theirs.get(k), mine[k]) for k in keys if theirs.get(k) != mine[k]}
        if differ:
            raise UsageError(f"{out_dir} holds {path.stem} prepared with other settings ("
                             + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                             + "); use another --out")
    state_dir(out_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(state_dir(out_dir) / f"{name}.json", json.dumps(mine, indent=1) + "\n")


def _load_settings(out_dir: Path) -> List[Settings]:
    """The settings of every list prepared in DIR."""
    paths = sorted(state_dir(out_dir).glob("*.json"))
    if not paths:
        raise UsageError(f"no list was prepared in {out_dir} (no {state_dir(out_dir)}/*.json): is it a folder "
                         f"written by {PROG}?")
    return [Settings(**json.loads(path.read_text(encoding="utf-8"))) for path in paths]


# ------------------------------------------------------------------------------------------------ new lists


def _kinetics_rows(path: str) -> Tuple[List[str], List[List[str]]]:
    """The header and the non-blank rows of a Kinetics CSV, in the order read_kinetics_csv lists them."""
    rows = [row for row in csv.reader(io.StringIO(Path(path).read_text(encoding="utf-8"), newline="")) if row]
    return rows[0], rows[1:]


def _write_list(out_dir: Path, name: str, source_list: str, samples: List[Sample], kept: List[bool],
                root: str) -> Path:
    target = out_dir / name
    buf = io.StringIO(newline="")
    if Path(source_list).suffix.lower() == ".csv" and name == Path(source_list).name:
        header, rows = _kinetics_rows(source_list)
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(row for row, keep in zip(rows, kept) if keep)
    else:
        for (video, label), keep in zip(samples, kept):
            if keep:
                buf.write(f"{copy_path(relative_source(video, root))} {label}\n")
    _write_atomic(target, buf.getvalue())
    return target


def merge_list(out_dir: Path, settings: Settings) -> Dict[str, Any]:
    """Write one list's new list(s) and ``<list>.unreadable.jsonl`` from its shards' manifests. Raises
    UsageError naming a shard whose manifest is missing or incomplete."""
    name = Path(settings.list).name
    groups = list_groups(settings.list, settings.data_root, settings.class_names)
    videos = unique_videos(groups, settings.data_root)
    entries: Dict[str, Dict[str, Any]] = {}
    for i in range(settings.shards):
        path = manifest_path(out_dir, name, (i, settings.shards))
        if not path.exists():
            raise UsageError(f"{name}: shard {i}/{settings.shards} has not run: {path} is missing")
        found = load_manifest(path, out_dir)
        missing = [v for v in videos[i::settings.shards] if v not in found]
        if missing:
            raise UsageError(f"{name}: shard {i}/{settings.shards} is incomplete: {len(missing)} video(s) not "
                             f"done (first: {missing[0]}); rerun it")
        entries.update(found)
    bad = [entries[v] for v in videos if entries[v]["status"] != "done"]
    unreadable = out_dir / f"{name}.unreadable.jsonl"
    _write_atomic(unreadable, "".join(json.dumps(e) + "\n" for e in bad))
    lists = []
    for list_name, samples in groups:
        kept = [entries[relative_source(v, settings.data_root)]["status"] == "done" for v, _ in samples]
        lists.append(str(_write_list(out_dir, list_name, settings.list, samples, kept, settings.data_root)))
    return {"videos": len(videos), "done": len(videos) - len(bad), "unreadable": len(bad), "lists": lists,
            "unreadable_file": str(unreadable)}


def merge(out_dir: Path) -> List[Dict[str, Any]]:
    """:func:`merge_list` for every list prepared in DIR."""
    return [merge_list(out_dir, settings) for settings in _load_settings(out_dir)]


# ------------------------------------------------------------------------------------------------ running


def _prepare_one(args: tuple) -> Dict[str, Any]:
    return prepare_video(*args, threads=1)  # workers share the cores: one codec thread each


def _run_shard(todo: List[str], settings: Settings, out_dir: Path, shard: Tuple[int, int], workers: int) -> int:
    from tqdm import tqdm

    jobs = [(rel, settings, str(out_dir)) for rel in todo]
    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    unreadable = 0
    try:
        results = (pool.imap_unordered(_prepare_one, jobs) if pool is not None
                   else (prepare_video(*job) for job in jobs))
        with open(manifest_path(out_dir, Path(settings.list).name, shard), "a", encoding="utf-8") as manifest:
            for entry in tqdm(results, total=len(jobs), desc="prepare", unit="video", file=sys.stderr,
                              dynamic_ncols=True):
                unreadable += entry["status"] != "done"
                manifest.write(json.dumps(entry) + "\n")
                manifest.flush()
    finally:
        if pool is not None:
            pool.terminate()
    return unreadable


def run(args: argparse.Namespace) -> int:
    if args.list is None:
        raise UsageError("--list is required (or: merge --out DIR)")
    if args.crf > MAX_CRF:
        raise UsageError(f"--crf is 0 to {MAX_CRF} for 8-bit libx264, got {args.crf}")
    root = annotation_root(args.list, args.data_root)
    if not os.path.isdir(root):
        raise UsageError(f"data root {root} is not a folder")
    settings = Settings(list=os.path.abspath(args.list), data_root=os.path.abspath(root), short_side=args.short_side,
                        keyint=args.keyint, crf=args.crf, preset=args.preset, shards=args.shard[1],
                        class_names=None if args.class_names is None else os.path.abspath(args.class_names))
    videos = unique_videos(list_groups(settings.list, settings.data_root, settings.class_names), settings.data_root)
    _settings_check(args.out, settings)
    mine = videos[args.shard[0]::args.shard[1]]
    done = load_manifest(manifest_path(args.out, Path(settings.list).name, args.shard), args.out)
    todo = [v for v in mine if v not in done]
    unreadable = _run_shard(todo, settings, args.out, args.shard, args.workers)
    print(f"shard {args.shard[0]}/{args.shard[1]}: {len(mine)} of {len(videos)} videos, {len(mine) - len(todo)} "
          f"already done, {len(todo) - unreadable} prepared, {unreadable} unreadable")
    if args.shard[1] == 1:
        _print_merged([merge_list(args.out, settings)])
    else:
        print(f"when every shard has run: {PROG} merge --out {args.out}")
    return 0


def _print_merged(results: List[Dict[str, Any]]) -> int:
    for r in results:
        listed = f" (listed in {r['unreadable_file']})" if r["unreadable"] else ""
        print(f"{r['done']} of {r['videos']} videos prepared, {r['unreadable']} unreadable{listed}; "
              f"lists: {', '.join(r['lists'])}")
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from ..cli import int_at_least, shard_arg

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog=f"{PROG} merge", description="write the new lists of every list "
                                    "prepared in DIR from its shards' manifests")
        p.add_argument("--out", type=Path, required=True, help="the folder the shards prepared")
        args = p.parse_args(argv[1:])
        args.merge = True
        return args
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog="lists: an mmaction2 list and a Kinetics CSV are rewritten in their format; an "
                                       "SSv2 JSON and UCF101/HMDB51 split files become mmaction2 lists "
                                       "('relative/path label') named <stem>_list.txt (HMDB51: "
                                       "hmdb51_split<N>_train_list.txt and _test_list.txt). After a job array: "
                                       f"{PROG} merge --out DIR")
    p.add_argument("--list", default=None, help="annotation file (mmaction2 list, Kinetics .csv, SSv2 .json, "
                                                "UCF101/HMDB51 split file)")
    p.add_argument("--data-root", default=None, help="where the list's paths are joined (default: its folder)")
    p.add_argument("--class-names", default=None,
                   help="class-name file numbering the labels of an SSv2 JSON or UCF101/HMDB51 split rewritten as an "
                        "mmaction2 list, as training with it would (e.g. m2clip_fast/assets/ssv2.txt); default: the "
                        "file's own numbering (SSv2: its sorted templates)")
    p.add_argument("--out", type=Path, required=True, help="folder for the copies, the manifests and the new lists")
    p.add_argument("--short-side", type=int_at_least(2), default=256, help="short side of the copies (never upscaled)")
    p.add_argument("--keyint", type=int_at_least(1), default=16, help="frames between keyframes")
    p.add_argument("--crf", type=int_at_least(0), default=23, help="libx264 constant rate factor (lower: better)")
    p.add_argument("--preset", default="medium", choices=X264_PRESETS, help="libx264 preset")
    p.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1),
                   help="processes encoding videos in parallel (0: this process)")
    p.add_argument("--shard", type=shard_arg, default=(0, 1), help="i/N: every N-th video from the i-th (i from 0)")
    p.add_argument("--merge", action="store_true", help="only write the lists from the shards' manifests")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import run_main

    args = parse_args(argv)
    if args.merge:
        return run_main(lambda: _print_merged(merge(args.out)), PROG)
    return run_main(lambda: run(args), PROG, on_interrupt=lambda: "rerun the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
