"""``python -m m2clip_fast.data.check LIST [LIST ...]``: scan a dataset's videos offline.

For every video of the annotation lists (mmaction2 lists, Kinetics CSVs, SSv2 JSONs, UCF101/HMDB51
official split files; labels are not needed): whether it opens and decodes (else why not), codec, size,
frame count, duration, frame rate, keyframe-interval statistics, and how :func:`~.decode.decode_frames`
will serve it: ``"sparse"`` (sparse seeking, checked frame for frame against a decode from the start on
``--windows`` random windows of 8 frames), ``"learned"`` (decoded through from the start once per
process, then seeking in the order that decode learnt, checked the same way), ``"fallback"`` (always
decoded through from the start), both with ``fallback_reason``, or ``"wrong"`` (sparse seeking
answered with other frames than the full decode: a decoder bug, please report the file). With
``--torchcodec``, also how ``--decoder torchcodec`` serves it: ``"served"`` (its frames equal the full decode
on the same windows), ``"pyav"`` (handed to PyAV, with ``torchcodec_reason``) or ``"wrong"``. One JSON
line per video goes to ``--out`` as soon as it is checked; a rerun with the same ``--out`` skips the
videos already there. A summary (readable / unreadable / fallback
counts, the slowest files) ends the scan.

Exit status: 0 when the scan ran, whatever it found; 1 with ``--fail-on-unreadable`` when a video is
unreadable; 2 for usage errors and unreadable lists.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .datasets import (DatasetError, official_split, read_kinetics_csv, read_list_file, read_split_file,
                       read_ssv2_json)
from .decode import DecodeStats, VideoDecodeError, VideoIndex, get_index, iter_frames, num_frames
from .frames import decode_frames
from .torchcodec_backend import require_torchcodec, unserved_reason

__all__ = ["list_videos", "check_video", "load_report", "summarize", "main"]

PROG = "python -m m2clip_fast.data.check"
WINDOW = 8  # frames per checked window: a clip's worth of consecutive frames
SLOWEST = 5


# ------------------------------------------------------------------------------------------------ lists


def _read_list(path: str, data_root: Optional[str]) -> List[str]:
    """The video paths of one annotation file, read by the reader its name calls for."""
    root = data_root if data_root is not None else str(Path(path).parent)
    split = official_split(path)
    if split is not None and split[0] == "ucf101" and not (Path(path).parent / "classInd.txt").is_file():
        return _first_fields(path, root)  # classInd.txt only numbers the labels, which a check does not need
    if split is not None:
        # HMDB51 marks training (1) and test (2) videos in the same file: check both
        both = [read_split_file(path, root, train=train) for train in (True, False)]
        return [p for samples in both for p, _ in samples]
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        samples = read_kinetics_csv(path, root)  # labels numbered from the CSV's own classes
    elif suffix == ".json":
        samples = read_ssv2_json(path, root)  # from its own templates
    else:
        samples = read_list_file(path, root)
    return [p for p, _ in samples]


def _first_fields(path: str, root: str) -> List[str]:
    """The video of each line of a UCF101 split file (``Class/v_x.avi [label]``), joined to ``root``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read UCF101 split file {path}: {exc}") from exc
    return [os.path.join(root, line.split()[0]) for line in lines if line.strip()]


def list_videos(lists: Sequence[str], data_root: Optional[str] = None) -> List[str]:
    """Every video path of ``lists``, once each, in list order. Raises DatasetError for a bad list."""
    seen: Dict[str, None] = {}
    for listing in lists:
        for path in _read_list(listing, data_root):
            seen.setdefault(path, None)
    if not seen:
        raise DatasetError(f"no videos in {', '.join(lists)}")
    return list(seen)


# ------------------------------------------------------------------------------------------------ one video


def check_video(path: str, windows: int = 4, torchcodec: bool = False) -> Dict[str, Any]:
    """The report entry of one video (see the module docstring); never raises for a bad file. ``torchcodec``:
    also check the torchcodec backend (torchcodec must be installed)."""
    start = time.perf_counter()
    entry: Dict[str, Any] = {"path": path}
    try:
        entry.update(_inspect(path, windows, torchcodec))
        entry["readable"] = True
    except VideoDecodeError as exc:
        entry.update(readable=False, reason=exc.reason)
    except Exception as exc:  # noqa: BLE001 - an odd file must not end a scan of thousands
        entry.update(readable=False, reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
    entry["seconds"] = round(time.perf_counter() - start, 4)
    return entry


def _keyframe_stats(index: VideoIndex) -> Dict[str, Any]:
    keys = np.nonzero(index.is_key)[0]
    gaps = np.diff(keys)
    return {"keyframes": int(keys.size),
            "keyframe_interval": None if not gaps.size else
            {"min": int(gaps.min()), "mean": round(float(gaps.mean()), 2), "max": int(gaps.max())}}


def _inspect(path: str, windows: int, torchcodec: bool) -> Dict[str, Any]:
    index = get_index(path)
    reason = unserved_reason(index) if torchcodec else None  # only what the index says: PyAV decodes through too
    if reason:
        torchcodec = False
        served = {"torchcodec": "pyav", "torchcodec_reason": reason}
    else:
        served = {}
    info: Dict[str, Any] = {
        "codec": index.codec, "width": index.width, "height": index.height,
        "duration": None if index.duration is None else round(index.duration, 3),
        "fps": None if index.average_rate is None else round(float(index.average_rate), 3),
        **_keyframe_stats(index), **served,
    }
    n = index.num_frames
    if not index.exact:  # decode_frames decodes it through the first time: readable, and learnt, or not
        n = num_frames(path)
        if get_index(path).learned is None:
            return {**info, "frames": n, "decode": "fallback", "fallback_reason": index.inexact_reason}
        info["fallback_reason"] = index.inexact_reason
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    starts = rng.integers(0, max(1, n - WINDOW + 1), size=windows)
    spans = [np.arange(s, min(n, s + WINDOW)) for s in starts]
    reference, count = _reference(path, {int(i) for span in spans for i in span})
    info.update(frames=count, windows_checked=len(spans))
    if count != n:
        return {**info, "decode": "wrong",
                "wrong_reason": f"a full decode gives {count} frames, the index lists {n}"}
    verdict = _sparse_verdict(path, spans, reference)
    if not index.exact and verdict["decode"] == "sparse":
        verdict["decode"] = "learned"
    if torchcodec:
        verdict.update(_torchcodec_verdict(path, spans, reference))
    return {**info, **verdict}


def _reference(path: str, wanted: set) -> tuple:
    """``({frame index: uint8 (H, W, 3)} for the wanted frames, frame count)`` from one decode of the
    whole video in output order: the definition of frame i, independent of the index."""
    frames: Dict[int, np.ndarray] = {}
    count = 0
    for count, frame in enumerate(iter_frames(path), 1):
        if count - 1 in wanted:
            frames[count - 1] = frame.to_ndarray(format="rgb24")
    return frames, count


def _expected(reference: Dict[int, np.ndarray], span: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([reference[int(i)] for i in span]))


def _sparse_verdict(path: str, spans: List[np.ndarray], reference: Dict[int, np.ndarray]) -> Dict[str, Any]:
    for span in spans:
        stats = DecodeStats()
        out = decode_frames(path, span, stats=stats)
        if stats.fallbacks:  # a check while decoding caught what the index could not show
            return {"decode": "fallback", "fallback_reason": get_index(path).inexact_reason}
        if not torch.equal(out, _expected(reference, span)):
            return {"decode": "wrong",
                    "wrong_reason": f"sparse frames {span[0]}..{span[-1]} differ from the full decode"}
    return {"decode": "sparse"}


def _torchcodec_verdict(path: str, spans: List[np.ndarray], reference: Dict[int, np.ndarray]) -> Dict[str, Any]:
    """The torchcodec backend on the same windows, for a file it serves by the index's rules."""
    for span in spans:
        stats = DecodeStats()
        out = decode_frames(path, span, backend="torchcodec", stats=stats)
        if stats.torchcodec_routed:  # torchcodec failed, or returned frames its check rejected
            return {"torchcodec": "pyav", "torchcodec_reason": "a check failed while torchcodec decoded"}
        if not torch.equal(out, _expected(reference, span)):
            return {"torchcodec": "wrong",
                    "torchcodec_wrong_reason": f"frames {span[0]}..{span[-1]} differ from the full decode"}
    return {"torchcodec": "served"}


# ------------------------------------------------------------------------------------------------ report


def load_report(path: Path) -> Dict[str, Dict[str, Any]]:
    """The entries already in a report, by video path. A line torn by an interrupted run is dropped
    (and cut from the file, so that new entries append to whole lines)."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    entries: Dict[str, Dict[str, Any]] = {}
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "path" in entry and "readable" in entry:
            entries[entry["path"]] = entry
            kept.append(line)
    if len(kept) != len(lines) or (lines and not text.endswith("\n")):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return entries


def summarize(entries: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts over report entries: readable, unreadable (with reasons), decode paths, the slowest files."""
    entries = list(entries)
    bad = [e for e in entries if not e["readable"]]
    good = [e for e in entries if e["readable"]]
    paths = Counter(e["decode"] for e in good)
    return {
        "videos": len(entries), "readable": len(good), "unreadable": len(bad),
        "sparse": paths["sparse"], "learned": paths["learned"], "fallback": paths["fallback"], "wrong": paths["wrong"],
        "fallback_reasons": dict(Counter(e["fallback_reason"] for e in good if e["decode"] in ("learned", "fallback"))),
        "torchcodec": dict(Counter(e["torchcodec"] for e in good if "torchcodec" in e)),
        "unreadable_files": [{"path": e["path"], "reason": e["reason"]} for e in bad],
        "slowest": [{"path": e["path"], "seconds": e["seconds"]}
                    for e in sorted(entries, key=lambda e: -e["seconds"])[:SLOWEST]],
    }


def format_summary(summary: Dict[str, Any], skipped: int) -> str:
    lines = [f"{summary['videos']} videos{f' ({skipped} already in the report)' if skipped else ''}: "
             f"{summary['readable']} readable, {summary['unreadable']} unreadable; "
             f"{summary['sparse']} seek exactly, {summary['learned'] + summary['fallback']} need the decode-through "
             f"fallback ({summary['learned']} of them only once per process, then seek)"
             + (f", {summary['wrong']} WRONG (sparse frames differ: please report)" if summary["wrong"] else "")]
    for reason, n in sorted(summary["fallback_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  fallback, {reason}: {n}")
    tc = summary.get("torchcodec") or {}
    if tc:
        lines.append(f"  --decoder torchcodec: {tc.get('served', 0)} decoded by torchcodec, {tc.get('pyav', 0)} by PyAV"
                     + (f", {tc['wrong']} WRONG (torchcodec frames differ: please report)" if tc.get("wrong") else ""))
    for bad in summary["unreadable_files"][:20]:
        lines.append(f"  unreadable {bad['path']}: {bad['reason']}")
    if summary["unreadable"] > 20:
        lines.append(f"  ... and {summary['unreadable'] - 20} more unreadable")
    if summary["slowest"]:
        lines.append("  slowest: " + ", ".join(f"{s['path']} ({s['seconds']:.2f} s)" for s in summary["slowest"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line


def _check_one(args: tuple) -> Dict[str, Any]:  # (path, windows, torchcodec)
    torch.set_num_threads(1)  # workers share the cores; a worker's decode is single-file work
    return check_video(*args)


def _scan(todo: List[str], windows: int, workers: int, report: Optional[Path],
          torchcodec: bool = False) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    done = []
    out = open(report, "a", encoding="utf-8") if report is not None else None
    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    try:
        results = (pool.imap_unordered(_check_one, [(p, windows, torchcodec) for p in todo]) if pool is not None
                   else (check_video(p, windows, torchcodec) for p in todo))
        for entry in tqdm(results, total=len(todo), desc="check", unit="video", file=sys.stderr, dynamic_ncols=True):
            done.append(entry)
            if out is not None:
                out.write(json.dumps(entry) + "\n")
                out.flush()
    finally:
        if pool is not None:
            pool.terminate()
        if out is not None:
            out.close()
    return done


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from ..cli import int_at_least

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("lists", nargs="+", metavar="LIST",
                   help="annotation files: mmaction2 list, Kinetics .csv, SSv2 .json, UCF101/HMDB51 split file")
    p.add_argument("--data-root", default=None, help="where the lists' paths are joined (default: each list's folder)")
    p.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1),
                   help="processes checking videos in parallel (0: this process)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON-lines report, one entry per video; videos already in it are skipped (resume)")
    p.add_argument("--windows", type=int_at_least(0), default=4,
                   help=f"random windows of {WINDOW} frames on which sparse seeking is checked per video")
    p.add_argument("--torchcodec", action="store_true",
                   help="also check --decoder torchcodec on the same windows (needs torchcodec)")
    p.add_argument("--fail-on-unreadable", action="store_true", help="exit 1 when any video is unreadable")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.torchcodec:
        require_torchcodec()  # before the scan: a one-line error with the install hint
    videos = list_videos(args.lists, args.data_root)
    previous = load_report(args.out) if args.out is not None else {}
    todo = [v for v in videos if v not in previous]
    fresh = {e["path"]: e for e in _scan(todo, args.windows, args.workers, args.out, args.torchcodec)}
    summary = summarize({**previous, **fresh}[v] for v in videos)
    print(format_summary(summary, skipped=len(videos) - len(todo)))
    return 1 if args.fail_on_unreadable and summary["unreadable"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import run_main

    args = parse_args(argv)
    return run_main(lambda: run(args), PROG)


if __name__ == "__main__":
    raise SystemExit(main())
