"""Transfer-protocol split files in ViFi-CLIP's published format: reading them, and drawing and writing such
files from a full list with a seed.

The format (github.com/muzairkhattak/ViFi-CLIP, ``datasets_splits/`` and ``labels/``; X-CLIP's lists are the
same) is two kinds of file:

* a **video list**: one ``relative/path label`` per line, the label an index from 0 into the label file the
  list goes with (the mmaction2 list format, so ``train --train-list`` reads one as it is);
* a **label file**: a CSV with the header ``id,name`` and row ``i`` = ``i,<class name>`` (a name holding a
  comma is quoted), ids from 0 in order. Every subset has its own label file, numbered from 0: the 160
  classes of a K600 zero-shot split, the base classes, the novel classes.

The published file names, which the readers here look for:

* K600 zero-shot: ``ZS_split{N}_K600_eval.txt`` with ``ZS_split{N}_K600.csv`` (N = 1, 2, 3; 160 of the 220
  Kinetics-600 classes that are not in Kinetics-400 each);
* few-shot: ``train1_few_shot_{K}.txt`` (K videos of every class, labels of the full class list), tested on
  the full test list (``val1.txt``);
* base-to-novel: ``base_train.txt``, ``fs_base_s{N}_train.txt`` (16 videos of every base class, seed N),
  ``base_val.txt`` and ``novel_val.txt``, with the label files ``<dataset>_base_labels.csv`` and
  ``<dataset>_novel_labels.csv`` (the writer here names them ``base_labels.csv`` / ``novel_labels.csv``).

Readers raise a one-line :class:`DatasetError` naming the file and line. The writers draw with
``random.Random(seed)``: the same full list and seed give the same files. What they write are *not* the
published splits (those were drawn by their authors); each written folder has a README.txt that says so.
"""
from __future__ import annotations

import csv
import io
import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .datasets import DatasetError, Sample, _csv_rows, _label, _read_lines, _squeeze

__all__ = [
    "K600_SPLITS",
    "K600_SPLIT_CLASSES",
    "BASE_SHOTS",
    "BASE_SEEDS",
    "k600_list_name",
    "k600_labels_name",
    "few_shot_list_name",
    "base_shot_list_name",
    "read_labels_csv",
    "write_labels_csv",
    "read_split_list",
    "write_split_list",
    "k_shot",
    "partition_classes",
    "k600_class_splits",
    "write_few_shot",
    "write_base_to_novel",
    "write_k600_zero_shot",
]

K600_SPLITS = 3
K600_SPLIT_CLASSES = 160  # of the 220 new classes, per split (ER-ZSAR's protocol, used by X-CLIP and ViFi-CLIP)
BASE_SHOTS = 16  # videos per base class in each fs_base_s{N}_train.txt (ViFi-CLIP)
BASE_SEEDS = 3

NOT_PUBLISHED = (
    "These split files were drawn by m2clip-fast (python -m m2clip_fast.make_splits) from a full list with a "
    "seed.\nThey are in ViFi-CLIP's format, but they are NOT the published splits: numbers obtained on them are "
    "not comparable with published results.\n")


def k600_list_name(split: int) -> str:
    return f"ZS_split{split}_K600_eval.txt"


def k600_labels_name(split: int) -> str:
    return f"ZS_split{split}_K600.csv"


def few_shot_list_name(shots: int) -> str:
    return f"train1_few_shot_{shots}.txt"


def base_shot_list_name(seed_index: int) -> str:
    return f"fs_base_s{seed_index}_train.txt"


# ------------------------------------------------------------------------------------------- reading


def read_labels_csv(path: os.PathLike) -> List[str]:
    """The class names of a ViFi-CLIP label file (``id,name``; row i holds id i): list index = label."""
    where = os.fspath(path)
    rows, problems = _csv_rows(path, "label file", required={"id", "name"})
    if problems:
        raise DatasetError(f"label file {where} {problems[0]}")
    names: List[str] = []
    seen: Dict[str, int] = {}
    for line, row in rows:
        name = row["name"].strip()
        if _label(row["id"].strip()) != len(names):
            raise DatasetError(f"label file {where} line {line}: id {row['id']!r}, expected {len(names)} "
                               f"(ids count from 0 in order)")
        if not name:
            raise DatasetError(f"label file {where} line {line}: empty class name")
        if name in seen:
            raise DatasetError(f"label file {where} line {line}: duplicate class name {name!r} "
                               f"(first on line {seen[name]})")
        seen[name] = line
        names.append(name)
    return names


def write_labels_csv(path: os.PathLike, names: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "name"])
    writer.writerows([i, name] for i, name in enumerate(names))
    Path(path).write_text(buffer.getvalue(), encoding="utf-8")


def read_split_list(path: os.PathLike, data_root: os.PathLike, num_classes: int) -> List[Sample]:
    """A ViFi-CLIP video list: ``(data_root/relative path, label)`` per line, every label in
    [0, num_classes). Blank lines are skipped; the label is the last field, so paths may hold spaces."""
    where = os.fspath(path)
    samples: List[Sample] = []
    for n, line in enumerate(_read_lines(path, "split file"), 1):
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        label = _label(parts[-1]) if len(parts) == 2 else None
        if label is None:
            raise DatasetError(f"split file {where} line {n}: expected 'relative/path label' (label a whole "
                               f"number from 0), got {line.strip()[:80]!r}")
        if label >= num_classes:
            raise DatasetError(f"split file {where} line {n}: label {label} is not in [0, {num_classes}) "
                               f"(its label file has {num_classes} classes)")
        samples.append((os.path.join(os.fspath(data_root), parts[0]), label))
    if not samples:
        raise DatasetError(f"split file {where}: no videos")
    return samples


def write_split_list(path: os.PathLike, samples: Sequence[Sample]) -> None:
    """``samples`` (relative path, label) as a video list, one per line."""
    for rel, _ in samples:
        if not rel.strip() or "\n" in rel or rel != rel.strip():
            raise DatasetError(f"cannot write {rel!r} to the split file {os.fspath(path)}: a path in a video "
                               f"list is one line, without surrounding blanks")
    Path(path).write_text("".join(f"{rel} {label}\n" for rel, label in samples), encoding="utf-8")


# ------------------------------------------------------------------------------------------- drawing


def _by_class(samples: Sequence[Sample]) -> Dict[int, List[int]]:
    """label → indices of its samples, in list order."""
    classes: Dict[int, List[int]] = {}
    for i, (_, label) in enumerate(samples):
        classes.setdefault(label, []).append(i)
    return classes


def k_shot(samples: Sequence[Sample], shots: int, classes: Sequence[int], rng: random.Random,
           what: str = "the list") -> List[Sample]:
    """``shots`` samples of every class in ``classes``, drawn without replacement; grouped by class (in the
    order of ``classes``), each class's videos in list order. A class with fewer videos is an error."""
    found = _by_class(samples)
    short = [(c, len(found.get(c, []))) for c in classes if len(found.get(c, [])) < shots]
    if short:
        c, n = short[0]
        raise DatasetError(f"{what}: class {c} has {n} video(s), fewer than {shots} shots"
                           + (f" (and {len(short) - 1} more such classes)" if len(short) > 1 else ""))
    return [samples[i] for c in classes for i in sorted(rng.sample(found[c], shots))]


def partition_classes(samples: Sequence[Sample], num_classes: int, how: str,
                      rng: Optional[random.Random] = None) -> Tuple[List[int], List[int]]:
    """``(base, novel)`` class indices, each ascending: the base half has ceil(C/2) classes. ``how``:
    "frequency" takes the classes with the most videos in ``samples`` as base (ties: the lower index), like
    ViFi-CLIP's published SSv2 partition (its 87 base classes are the larger ones: 17,562 validation videos
    in base_val.txt against 7,215 in novel_val.txt);
    "random" draws the base half with ``rng``."""
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    half = (num_classes + 1) // 2
    if how == "frequency":
        base = sorted(sorted(range(num_classes), key=lambda c: (-counts[c], c))[:half])
    elif how == "random":
        base = sorted(rng.sample(range(num_classes), half))
    else:
        raise DatasetError(f"base classes are chosen by 'frequency' or 'random', not {how!r}")
    chosen = set(base)
    return base, [c for c in range(num_classes) if c not in chosen]


def k600_class_splits(new_classes: Sequence[str], rng: random.Random) -> List[List[str]]:
    """Three 160-class subsets of the new classes, each in the order of ``new_classes``."""
    if len(new_classes) < K600_SPLIT_CLASSES:
        raise DatasetError(f"need at least {K600_SPLIT_CLASSES} classes to draw a K600 split, "
                           f"got {len(new_classes)}")
    splits = []
    for _ in range(K600_SPLITS):
        keep = set(rng.sample(range(len(new_classes)), K600_SPLIT_CLASSES))
        splits.append([name for i, name in enumerate(new_classes) if i in keep])
    return splits


def _relabel(samples: Sequence[Sample], classes: Sequence[int]) -> List[Sample]:
    """The samples of ``classes``, each labelled by its class's position in ``classes``."""
    new = {c: i for i, c in enumerate(classes)}
    return [(rel, new[label]) for rel, label in samples if label in new]


def _check_labels(samples: Sequence[Sample], num_classes: int, what: str) -> None:
    for rel, label in samples:
        if not 0 <= label < num_classes:
            raise DatasetError(f"{what}: {rel} has label {label}, not in [0, {num_classes})")


def _readme(out: Path, lines: Sequence[str]) -> None:
    (out / "README.txt").write_text(NOT_PUBLISHED + "\n" + "\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- writing


def write_few_shot(out: os.PathLike, train: Sequence[Sample], num_classes: int, shots: Sequence[int],
                   seed: int) -> List[Path]:
    """``train1_few_shot_{K}.txt`` for every K in ``shots``: K videos of every class of the full training list
    ``train`` (relative path, label), each K drawn with its own generator seeded by (seed, K)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_labels(train, num_classes, "training list")
    written = []
    for k in shots:
        picked = k_shot(train, k, range(num_classes), random.Random(f"{seed}/{k}"), "training list")
        written.append(out / few_shot_list_name(k))
        write_split_list(written[-1], picked)
    _readme(out, [f"seed {seed}; {len(train)} training videos of {num_classes} classes.",
                  *(f"{path.name}: {k} per class, labels of the full class list; test on the full test list."
                    for k, path in zip(shots, written))])
    return written


def write_base_to_novel(out: os.PathLike, train: Sequence[Sample], test: Sequence[Sample],
                        class_names: Sequence[str], seed: int, how: str = "frequency",
                        shots: int = BASE_SHOTS) -> Tuple[List[int], List[int]]:
    """The base-to-novel files of ViFi-CLIP from full training and test lists (relative path, label):
    base_train.txt, fs_base_s{1,2,3}_train.txt (``shots`` per base class, seeds (seed, 1..3)), base_val.txt,
    novel_val.txt, base_labels.csv and novel_labels.csv. Returns the (base, novel) class indices."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_labels(train, len(class_names), "training list")
    _check_labels(test, len(class_names), "test list")
    base, novel = partition_classes(train, len(class_names), how, random.Random(f"{seed}/base"))
    base_train = _relabel(train, base)
    write_split_list(out / "base_train.txt", base_train)
    for s in range(1, BASE_SEEDS + 1):
        write_split_list(out / base_shot_list_name(s),
                         k_shot(base_train, shots, range(len(base)), random.Random(f"{seed}/{s}"), "training list"))
    write_split_list(out / "base_val.txt", _relabel(test, base))
    write_split_list(out / "novel_val.txt", _relabel(test, novel))
    write_labels_csv(out / "base_labels.csv", [class_names[c] for c in base])
    write_labels_csv(out / "novel_labels.csv", [class_names[c] for c in novel])
    _readme(out, [f"seed {seed}; base classes by {how}: {len(base)} base, {len(novel)} novel of {len(class_names)}.",
                  f"fs_base_s1..{BASE_SEEDS}_train.txt: {shots} videos per base class; base_train.txt: all of them.",
                  "base_val.txt / novel_val.txt: the test videos of those classes, labelled by base_labels.csv / "
                  "novel_labels.csv."])
    return base, novel


def write_k600_zero_shot(out: os.PathLike, videos: Sequence[Sample], class_names: Sequence[str],
                         new_classes: Sequence[str], seed: int) -> List[List[str]]:
    """ZS_split{1,2,3}_K600_eval.txt and ZS_split{N}_K600.csv: three 160-class subsets of ``new_classes``
    (matched to ``class_names``, the classes of ``videos``, by name without case and punctuation), each with
    the videos of its classes. Returns the class names of every split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_labels(videos, len(class_names), "K600 list")
    index = {_squeeze(name): i for i, name in enumerate(class_names)}
    missing = [name for name in new_classes if _squeeze(name) not in index]
    if missing:
        raise DatasetError(f"the class names lack {len(missing)} of the {len(new_classes)} Kinetics-600 classes "
                           f"that are not in Kinetics-400, e.g. {missing[:3]}: give the list's Kinetics-600 names")
    splits = k600_class_splits(new_classes, random.Random(seed))
    for n, names in enumerate(splits, 1):
        rows = _relabel(videos, [index[_squeeze(name)] for name in names])
        if not rows:
            raise DatasetError(f"K600 list: no video of the classes of split {n}")
        write_split_list(out / k600_list_name(n), rows)
        write_labels_csv(out / k600_labels_name(n), names)
    _readme(out, [f"seed {seed}; {K600_SPLITS} splits of {K600_SPLIT_CLASSES} of the {len(new_classes)} "
                  f"Kinetics-600 classes not in Kinetics-400."])
    return splits
