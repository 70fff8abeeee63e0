"""``python -m m2clip_fast.make_splits``: transfer split files in ViFi-CLIP's format, drawn from your full lists
with a seed, for when the published ones do not fit your copy of a dataset.

    few-shot:       --list TRAIN --class-names C --shots 2,4,8,16 --seed 0 --out DIR
    base-to-novel:  --list TRAIN --test-list TEST --class-names C --seed 0 --out DIR [--base frequency|random]
    k600-zeroshot:  --list K600_LIST --class-names K600_NAMES --seed 0 --out DIR

The lists are any annotation file ``train`` reads; the written video paths are relative to their root
(``--data-root``, else the list's folder): give the same ``--data-root`` to ``train`` and ``evaluate``. The
files are NOT the published splits (DIR/README.txt says so): see :mod:`m2clip_fast.data.splits`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from .cli import int_at_least, run_main
from .data.datasets import Sample, annotation_root, read_annotations
from .data.splits import write_base_to_novel, write_few_shot, write_k600_zero_shot
from .errors import UsageError
from .text import load_class_names

PROTOCOLS = ("few-shot", "base-to-novel", "k600-zeroshot")
K600_NEW = "kinetics600_new220"


def shots_arg(text: str) -> List[int]:
    """argparse type: shot counts, e.g. '2,4,8,16'."""
    try:
        shots = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shot counts like 2,4,8,16, got {text!r}") from None
    if any(k < 1 for k in shots) or len(set(shots)) != len(shots):
        raise argparse.ArgumentTypeError(f"shot counts are distinct whole numbers >= 1, got {text!r}")
    return shots


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.make_splits", description=__doc__.splitlines()[0])
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--list", required=True, help="the full list: training videos (few-shot, base-to-novel) or "
                                                 "Kinetics-600 videos (k600-zeroshot), any format train reads")
    p.add_argument("--test-list", default=None, help="base-to-novel: the full test list")
    p.add_argument("--class-names", required=True,
                   help="the lists' classes: a shipped list name, one name per line, or a label file (id,name CSV)")
    p.add_argument("--data-root", default=None, help="the folder the lists' paths are relative to")
    p.add_argument("--shots", type=shots_arg, default=[2, 4, 8, 16], help="few-shot: K per class, e.g. 2,4,8,16")
    p.add_argument("--base-shots", type=int_at_least(1), default=16,
                   help="base-to-novel: videos per base class in fs_base_sN_train.txt")
    p.add_argument("--base", choices=("frequency", "random"), default="frequency",
                   help="base-to-novel: the base half is the classes with most training videos, or drawn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write the split files (and README.txt) to")
    args = p.parse_args(argv)
    if (args.protocol == "base-to-novel") != (args.test_list is not None):
        p.error("--test-list is given for base-to-novel, and only there")
    return args


def relative_samples(path: str, data_root: Optional[str], class_names: Sequence[str], train: bool) -> List[Sample]:
    """An annotation file's samples with paths relative to its root, as a split file holds them."""
    root = annotation_root(path, data_root)
    return [(os.path.relpath(p, root), label) for p, label in read_annotations(path, data_root, class_names, train)]


def make_splits(args: argparse.Namespace) -> str:
    """Write the split files of ``args.protocol``; returns what was written, in a few lines."""
    names = load_class_names(args.class_names)
    videos = relative_samples(args.list, args.data_root, names, train=args.protocol != "k600-zeroshot")
    if args.protocol == "few-shot":
        paths = write_few_shot(args.out, videos, len(names), args.shots, args.seed)
        return "\n".join(f"wrote {p}" for p in paths)
    if args.protocol == "base-to-novel":
        test = relative_samples(args.test_list, args.data_root, names, train=False)
        base, novel = write_base_to_novel(args.out, videos, test, names, args.seed, args.base, args.base_shots)
        return f"wrote {args.out}: {len(base)} base and {len(novel)} novel classes"
    if args.protocol == "k600-zeroshot":
        splits = write_k600_zero_shot(args.out, videos, names, load_class_names(K600_NEW), args.seed)
        return f"wrote {args.out}: {len(splits)} splits of {len(splits[0])} classes"
    raise UsageError(f"unknown protocol {args.protocol!r}")


def main(argv: Optional[List[str]] = None) -> int:
    def run() -> int:
        print(make_splits(parse_args(argv)))
        print("these are not the published splits (see README.txt there)")
        return 0

    return run_main(run, "python -m m2clip_fast.make_splits")


if __name__ == "__main__":
    sys.exit(main())
