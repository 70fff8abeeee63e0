"""Annotation readers for Kinetics-400, Something-Something-V2, UCF101, HMDB51 and mmaction2 lists.

Every reader returns a list of ``(path, label_index)`` samples with ``path`` joined to the data
root. Malformed annotations raise one :class:`DatasetError` that lists every problem found (the
first 20 and a count), not just the first. :func:`check_samples` does the same for missing files
and labels out of range, or drops missing files and reports them. :func:`read_split_file` reads a
UCF101 / HMDB51 official split file recognised by its name (see :func:`official_split`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import UsageError, UserError

__all__ = [
    "Sample",
    "DatasetError",
    "read_class_names",
    "read_list_file",
    "read_kinetics_csv",
    "read_ssv2_json",
    "read_ucf101",
    "read_hmdb51",
    "official_split",
    "read_split_file",
    "check_samples",
    "annotation_root",
    "read_annotations",
    "read_split",
    "load_samples",
]

Sample = Tuple[str, int]
PathLike = Union[str, os.PathLike]
_SHOWN = 20


class DatasetError(UserError, ValueError):
    """Bad annotations or data. ``problems`` holds one string per problem found."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.problems))


def _raise_if(problems: List[str], what: str, notes: Sequence[str] = ()) -> None:
    """Raise one DatasetError listing the first problems and a count, then ``notes`` (hints at the cause)."""
    if not problems:
        return
    shown = "\n  ".join(problems[:_SHOWN])
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    hints = "".join(f"\n{note}" for note in notes)
    raise DatasetError(f"{what}: {len(problems)} problem(s):\n  {shown}{more}{hints}", problems)


_LABEL = re.compile(r"[0-9]+")  # plain ASCII digits: int() would also take "0_1", " 3", "٣" or "²"


def _label(text: str) -> Optional[int]:
    """A label field as an int, or None when it is not plain ASCII digits."""
    return int(text) if _LABEL.fullmatch(text) else None


def _read_text(path: PathLike, what: str) -> str:
    """The file as text; a UTF-8 byte-order mark (Windows editors write one) is dropped, as it would glue
    itself to the first path, header or class name."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {os.fspath(path)}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{what} {os.fspath(path)} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                           f"offset {exc.start}): a binary file, or another encoding?") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {os.fspath(path)}: {exc}") from exc


def _read_lines(path: PathLike, what: str) -> List[str]:
    return _read_text(path, what).splitlines()


def read_class_names(path: PathLike) -> List[str]:
    """Class names, one per line; line ``i`` (from 0) is label ``i``.

    Surrounding whitespace is stripped and trailing blank lines are ignored. A blank line between
    names (it would shift every later label) and duplicate names raise :class:`DatasetError`.
    """
    lines = [line.strip() for line in _read_lines(path, "class-name file")]
    while lines and not lines[-1]:
        lines.pop()
    problems = [f"line {i + 1}: empty class name" for i, name in enumerate(lines) if not name]
    first_seen: Dict[str, int] = {}
    for i, name in enumerate(lines):
        if name and name in first_seen:
            problems.append(f"line {i + 1}: duplicate class name {name!r} (first on line {first_seen[name] + 1})")
        first_seen.setdefault(name, i)
    if not lines:
        problems.append("no class names")
    _raise_if(problems, f"class-name file {os.fspath(path)}")
    return lines


def _join(root: Optional[PathLike], rel: str) -> str:
    return os.path.join(os.fspath(root), rel) if root is not None else rel


def read_list_file(list_path: PathLike, data_root: Optional[PathLike] = None) -> List[Sample]:
    """mmaction2 video list: lines ``relative/path label_index``.

    The label is the last whitespace-separated field, so paths may contain spaces. Blank lines
    are skipped. ``data_root`` defaults to the list file's directory.
    """
    root = Path(list_path).parent if data_root is None else data_root
    samples: List[Sample] = []
    problems = []
    for n, line in enumerate(_read_lines(list_path, "list file"), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            problems.append(f"line {n}: expected 'path label', got {line!r}")
            continue
        rel, label = parts
        if _label(label) is None:
            problems.append(f"line {n}: label {label!r} is not an integer (digits 0-9 only)")
            continue
        samples.append((_join(root, rel), _label(label)))
    _raise_if(problems, f"list file {os.fspath(list_path)}")
    return samples


def _label_map(names: Union[PathLike, Sequence[str], Mapping[str, int]]) -> Dict[str, int]:
    if isinstance(names, Mapping):
        return {str(k): int(v) for k, v in names.items()}
    if isinstance(names, (str, os.PathLike)):
        names = read_class_names(names)
    names = list(names)
    if len(set(names)) != len(names):
        raise DatasetError("duplicate class names in the class list")
    return {name: i for i, name in enumerate(names)}


def _kinetics_folder(root: str, label: str) -> Optional[str]:
    for folder in (label, label.replace(" ", "_")):
        if os.path.isdir(os.path.join(root, folder)):
            return folder
    return None


def read_kinetics_csv(
    csv_path: PathLike,
    data_root: PathLike,
    class_names: Optional[Union[PathLike, Sequence[str]]] = None,
    *,
    layout: str = "auto",
    split: Optional[str] = None,
    ext: str = ".mp4",
) -> List[Sample]:
    """Kinetics annotation CSV (columns ``label, youtube_id, time_start, time_end, split``).

    The video of a row is ``{youtube_id}_{time_start:06d}_{time_end:06d}{ext}``, either inside a
    per-label folder (``layout="per_label"``; the folder is the label, or the label with spaces
    replaced by underscores, whichever exists) or directly under ``data_root``
    (``layout="flat"``). ``layout="auto"`` picks per-label when any label folder exists under
    ``data_root``, flat otherwise. Label indices come from ``class_names`` (a list or a
    class-name file); without it, from the sorted distinct labels of the CSV. ``split`` keeps only
    rows of that split.
    """
    root = os.fspath(data_root)
    what = f"Kinetics CSV {os.fspath(csv_path)}"
    rows, problems = _csv_rows(csv_path, "Kinetics CSV", required={"label", "youtube_id", "time_start", "time_end"})
    if split is not None:
        rows = [(n, r) for n, r in rows if r.get("split") == split]
    labels = _label_map(class_names) if class_names is not None else {
        name: i for i, name in enumerate(sorted({r["label"] for _, r in rows}))}
    if layout not in ("auto", "per_label", "flat"):
        raise UsageError(f"layout must be 'auto', 'per_label' or 'flat', got {layout!r}")
    folders = {name: _kinetics_folder(root, name) for name in {r["label"] for _, r in rows}}
    if layout == "auto":
        layout = "per_label" if any(folders.values()) else "flat"

    samples: List[Sample] = []
    for n, row in rows:
        label = row["label"]
        if label not in labels:
            problems.append(f"line {n}: unknown class {label!r}")
            continue
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except (ValueError, OverflowError):  # OverflowError: inf
            problems.append(f"line {n}: bad time_start/time_end {row['time_start']!r}, {row['time_end']!r}")
            continue
        name = f"{row['youtube_id']}_{start:06d}_{end:06d}{ext}"
        rel = os.path.join(folders[label] or label, name) if layout == "per_label" else name
        samples.append((os.path.join(root, rel), labels[label]))
    _raise_if(problems, what)
    return samples


def _csv_rows(csv_path: PathLike, kind: str, required: set) -> Tuple[List[Tuple[int, Dict[str, str]]], List[str]]:
    """``(line number, row dict)`` of a CSV with a header naming at least ``required``, and one problem per
    row with fewer fields than the header (a partly downloaded file, a stray line). Blank lines are skipped."""
    what = f"{kind} {os.fspath(csv_path)}"
    reader = csv.reader(io.StringIO(_read_text(csv_path, kind), newline=""))
    records = _csv_records(reader, what)
    header = next(records, None)
    while header == []:
        header = next(records, None)
    if header is None:
        raise DatasetError(f"{what} has no rows")
    missing_cols = required - set(header)
    if missing_cols:
        raise DatasetError(f"{what} lacks columns {sorted(missing_cols)}")
    rows, problems = [], []
    for fields in records:
        if not fields:
            continue
        if len(fields) < len(header):
            problems.append(f"line {reader.line_num}: expected {len(header)} fields ({','.join(header)}), "
                            f"got {len(fields)}: {','.join(fields)[:80]!r}")
            continue
        rows.append((reader.line_num, dict(zip(header, fields))))
    if not rows and not problems:
        raise DatasetError(f"{what} has no rows")
    return rows, problems


def _csv_records(reader, what: str) -> Iterable[List[str]]:
    """The reader's records, with csv's own errors (a field over its 128 KB limit, e.g. after an unterminated
    quote; a NUL byte) as a DatasetError naming the line."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetError(f"{what} line {reader.line_num}: not readable as CSV ({exc}): an unterminated "
                               f"quote?") from None
        yield fields


def _template_name(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def read_ssv2_json(
    json_path: PathLike,
    data_root: PathLike,
    labels: Optional[Union[PathLike, Mapping[str, int]]] = None,
    *,
    ext: str = ".webm",
) -> List[Sample]:
    """Something-Something-V2 annotation JSON (a list of ``{"id", "template", ...}``).

    The class of an entry is its template with the brackets of ``[something]`` removed; its
    index comes from ``labels`` (the SSv2 labels JSON ``{name: index}`` or such a mapping) or,
    without it, from the sorted distinct templates. The video is ``{id}{ext}`` under
    ``data_root``.
    """
    def load(path, what):
        text = _read_text(path, f"SSv2 {what}")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"SSv2 {what} {os.fspath(path)} is not valid JSON: {exc}") from None
        except RecursionError:
            raise DatasetError(f"SSv2 {what} {os.fspath(path)}: nested too deeply to read (not an SSv2 "
                               f"annotation file?)") from None

    entries = load(json_path, "annotation JSON")
    if not isinstance(entries, list):
        raise DatasetError(f"SSv2 annotation JSON {os.fspath(json_path)} must be a list of entries")
    if labels is None:
        names = sorted({_template_name(e["template"]) for e in entries
                        if isinstance(e, dict) and isinstance(e.get("template"), str)})
        label_map = {name: i for i, name in enumerate(names)}
    elif isinstance(labels, Mapping):
        label_map = {str(k): int(v) for k, v in labels.items()}
    else:
        loaded = load(labels, "labels JSON")
        if not isinstance(loaded, dict):
            raise DatasetError(f"SSv2 labels JSON {os.fspath(labels)} must map names to indices")
        label_map = _ssv2_labels(loaded, labels)

    samples: List[Sample] = []
    problems = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("template"), str):
            problems.append(f"entry {n}: needs 'id' and 'template', got {str(entry)[:80]}")
            continue
        name = _template_name(entry["template"])
        if name not in label_map:
            problems.append(f"entry {n} (id {entry['id']}): unknown class {name!r}")
            continue
        samples.append((os.path.join(os.fspath(data_root), f"{entry['id']}{ext}"), label_map[name]))
    _raise_if(problems, f"SSv2 annotation JSON {os.fspath(json_path)}")
    return samples


def _ssv2_labels(loaded: Dict[str, object], path: PathLike) -> Dict[str, int]:
    """An SSv2 labels JSON's ``{name: index}`` (indices as ints or digit strings, as the official file has)."""
    label_map, problems = {}, []
    for name, value in loaded.items():
        index = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else (
            _label(value) if isinstance(value, str) else None)
        if index is None:
            problems.append(f"class {name!r}: index {value!r} is not a non-negative integer")
        else:
            label_map[str(name)] = index
    _raise_if(problems, f"SSv2 labels JSON {os.fspath(path)}")
    return label_map


def _ucf_classes(split_dir: Path) -> Dict[str, int]:
    classes: Dict[str, int] = {}
    numbers: Dict[int, int] = {}
    problems = []
    for n, line in enumerate(_read_lines(split_dir / "classInd.txt", "UCF101 classInd.txt"), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not _label(parts[0]):
            problems.append(f"classInd.txt line {n}: expected 'number ClassName' (number from 1), got {line!r}")
            continue
        number = _label(parts[0])
        if parts[1] in classes:
            problems.append(f"classInd.txt line {n}: duplicate class {parts[1]!r}")
        if number in numbers:  # two classes under one label would train as one
            problems.append(f"classInd.txt line {n}: number {number} already used on line {numbers[number]}")
        numbers.setdefault(number, n)
        classes[parts[1]] = number - 1  # classInd is 1-based
    _raise_if(problems, f"UCF101 split directory {split_dir}")
    return classes


def read_ucf101(split_dir: PathLike, data_root: PathLike, *, split: int = 1, train: bool = True) -> List[Sample]:
    """UCF101 official splits (``classInd.txt``, ``trainlist0N.txt``, ``testlist0N.txt``).

    ``classInd.txt`` lines are ``1 ApplyEyeMakeup`` (1-based; label = number - 1). Train lines
    ``Class/v_x.avi 1`` carry the 1-based label, which must agree with the folder; test lines
    ``Class/v_x.avi`` take the label of the folder (matched case-insensitively, since the
    official lists spell some classes differently from classInd).
    """
    if split not in (1, 2, 3):
        raise UsageError(f"UCF101 split must be 1, 2 or 3, got {split}")
    split_dir = Path(split_dir)
    classes = _ucf_classes(split_dir)
    folded = {name.lower(): idx for name, idx in classes.items()}
    list_name = f"{'train' if train else 'test'}list0{split}.txt"
    samples: List[Sample] = []
    problems = []
    for n, line in enumerate(_read_lines(split_dir / list_name, f"UCF101 {list_name}"), 1):
        parts = line.split()
        if not parts:
            continue
        rel = parts[0]
        folder = rel.replace("\\", "/").split("/")[0]
        from_folder = classes.get(folder, folded.get(folder.lower()))
        if from_folder is None:
            problems.append(f"{list_name} line {n}: unknown class folder {folder!r}")
            continue
        label = from_folder
        if len(parts) > 1:
            if not _label(parts[1]):
                problems.append(f"{list_name} line {n}: label {parts[1]!r} is not an integer from 1")
                continue
            label = _label(parts[1]) - 1
            if label != from_folder:
                problems.append(f"{list_name} line {n}: label {parts[1]} disagrees with folder "
                                f"{folder!r} (class {from_folder + 1})")
                continue
        samples.append((os.path.join(os.fspath(data_root), rel), label))
    _raise_if(problems, f"UCF101 {split_dir / list_name}")
    return samples


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")


def read_hmdb51(
    split_dir: PathLike,
    data_root: PathLike,
    *,
    split: int = 1,
    train: bool = True,
    class_names: Optional[Union[PathLike, Sequence[str]]] = None,
) -> List[Sample]:
    """HMDB51 official splits: ``{class}_test_split{N}.txt`` with lines ``video.avi 0|1|2``.

    1 marks a training video, 2 a test video, 0 an unused one. Videos are ``{class}/{video}``
    under ``data_root``. Labels follow ``class_names`` if given, else the sorted class names of
    the split files.
    """
    if split not in (1, 2, 3):
        raise UsageError(f"HMDB51 split must be 1, 2 or 3, got {split}")
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"HMDB51 split directory not found: {split_dir}")
    files = {}
    for entry in sorted(os.listdir(split_dir)):
        m = _HMDB_SPLIT.match(entry)
        if m and int(m.group("split")) == split:
            files[m.group("cls")] = split_dir / entry
    if not files:
        raise DatasetError(f"no '*_test_split{split}.txt' files in {split_dir}")
    labels = _label_map(class_names) if class_names is not None else {c: i for i, c in enumerate(sorted(files))}
    wanted = "1" if train else "2"
    samples: List[Sample] = []
    problems = [f"split file for unknown class {c!r}" for c in files if c not in labels]
    for cls in sorted(files):
        if cls not in labels:
            continue
        for n, line in enumerate(_read_lines(files[cls], "HMDB51 split file"), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                problems.append(f"{files[cls].name} line {n}: expected 'video.avi 0|1|2', got {line!r}")
                continue
            if parts[1] == wanted:
                samples.append((os.path.join(os.fspath(data_root), cls, parts[0]), labels[cls]))
    _raise_if(problems, f"HMDB51 split directory {split_dir}")
    return samples


_UCF_SPLIT = re.compile(r"^(?P<part>train|test)list0(?P<split>[123])\.txt$")


def official_split(path: PathLike) -> Optional[Tuple[str, int]]:
    """``("ucf101", N)`` for a UCF101 ``trainlist0N.txt`` / ``testlist0N.txt``, ``("hmdb51", N)`` for an HMDB51
    ``{class}_test_splitN.txt``, ``None`` for any other file name. Only the name is looked at."""
    name = Path(path).name
    for dataset, pattern in (("ucf101", _UCF_SPLIT), ("hmdb51", _HMDB_SPLIT)):
        m = pattern.match(name)
        if m:
            return dataset, int(m.group("split"))
    return None


def _squeeze(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _check_ucf_classes(split_dir: Path, class_names: Sequence[str]) -> None:
    """classInd.txt decides the labels of a UCF101 split: it must list ``class_names`` in the same order
    (compared without case and punctuation, so "ApplyEyeMakeup" matches "apply eye makeup")."""
    ordered = sorted(_ucf_classes(split_dir).items(), key=lambda kv: kv[1])
    problems = [f"label {i}: classInd.txt has {ind!r}, the class names have {given!r}"
                for i, ((ind, _), given) in enumerate(zip(ordered, class_names)) if _squeeze(ind) != _squeeze(given)]
    if len(ordered) != len(class_names):
        problems.insert(0, f"classInd.txt lists {len(ordered)} classes, the class names {len(class_names)}")
    _raise_if(problems, f"UCF101 {split_dir / 'classInd.txt'} disagrees with the class names")


def read_split_file(
    path: PathLike,
    data_root: PathLike,
    *,
    train: bool,
    class_names: Optional[Sequence[str]] = None,
) -> List[Sample]:
    """Samples of the official split that ``path`` names (see :func:`official_split`).

    UCF101: ``trainlist0N.txt`` gives the training videos of split N, ``testlist0N.txt`` the test videos
    (labelled by their class folder); ``classInd.txt`` must be next to it, and the labels are its
    (1-based) numbers minus one, checked against ``class_names`` when given. HMDB51: any one
    ``{class}_test_splitN.txt`` stands for split N of its folder (every class's file): the videos marked 1
    when ``train``, else those marked 2. Raises ``ValueError`` for another file name.
    """
    found = official_split(path)
    if found is None:
        raise DatasetError(f"{os.fspath(path)} is not named like a UCF101 or HMDB51 official split file")
    dataset, split = found
    split_dir = Path(path).parent
    if dataset == "ucf101" and not (split_dir / "classInd.txt").is_file():
        raise DatasetError(f"{os.fspath(path)} is named like a UCF101 split file, but there is no classInd.txt "
                           f"next to it (in {split_dir}) to number the classes; put it there, or write an "
                           f"mmaction2 list ('path label', labels from 0) under another name")
    try:
        if dataset == "hmdb51":
            return read_hmdb51(split_dir, data_root, split=split, train=train, class_names=class_names)
        if class_names is not None:
            _check_ucf_classes(split_dir, class_names)
        return read_ucf101(split_dir, data_root, split=split,
                           train=_UCF_SPLIT.match(Path(path).name)["part"] == "train")
    except DatasetError as exc:
        # the name alone chose this reader: say so, since a list of another format under that name reads wrong
        how = ("UCF101 split file (trainlist0N.txt / testlist0N.txt, labelled by classInd.txt beside it)"
               if dataset == "ucf101" else
               f"HMDB51 split file (<class>_test_splitN.txt: every such file of split {split} in its folder is read)")
        raise DatasetError(f"{exc}\n{os.fspath(path)} was read as an official {how} because of its name; an "
                           f"mmaction2 list ('path label', labels from 0) must be named otherwise, e.g. train.txt",
                           exc.problems) from None


def check_samples(
    samples: Iterable[Sample],
    num_classes: int,
    *,
    skip_missing: bool = False,
    what: Optional[str] = None,
    root: Optional[PathLike] = None,
) -> Tuple[List[Sample], List[Dict[str, str]]]:
    """Check every sample at once: file present, label an int in [0, num_classes).

    Returns ``(kept, dropped)``. Labels out of range always raise :class:`DatasetError` (they
    mean a wrong class list, which skipping would hide). Missing files raise too, listing all of
    them, unless ``skip_missing``: then they are dropped and returned in ``dropped`` as
    ``{"path", "reason"}`` dicts so the caller can report them. When no listed file exists the
    error says so, naming ``root`` (where the paths were joined), since a wrong data root is the
    usual cause; no sample at all is an error too. Empty (0-byte) files are kept: like any other
    undecodable video, the loader replaces them, counts them and reports them.

    ``what`` names the samples in messages (e.g. "training list train.txt").
    """
    samples = list(samples)
    what = what or f"dataset of {len(samples)} samples"
    if not samples:
        raise DatasetError(f"{what}: no samples")
    bad_labels, missing, kept = [], [], []
    first_label: Dict[str, int] = {}
    for path, label in samples:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            bad_labels.append(f"{path}: label {label!r} not in [0, {num_classes})")
            continue
        if first_label.setdefault(path, label) != label:  # listed twice: fine; with two labels: which one?
            bad_labels.append(f"{path}: listed with label {first_label[path]} and again with label {label}")
            continue
        if os.path.isfile(path):
            kept.append((path, label))
        else:
            missing.append({"path": path, "reason": "file not found" if not os.path.exists(path) else "not a file"})
    notes = []
    if missing and not kept:
        where = f" under {os.fspath(root)}" if root is not None else ""
        notes.append(f"none of the {len(missing)} listed files exists{where}: is the data root (--data-root) right?")
    elif missing and not skip_missing:
        notes.append(f"{len(missing)} missing file(s): --skip-missing (skip_missing=True) drops them and goes on "
                     f"(train lists them in skipped.jsonl)")
    problems = bad_labels + ([] if skip_missing and kept else [f"{m['path']}: {m['reason']}" for m in missing])
    _raise_if(problems, what, notes)
    return kept, missing


# ------------------------------------------------------------------------------- routing by file name


def annotation_root(path: PathLike, data_root: Optional[PathLike]) -> str:
    """Where an annotation file's video paths are joined: ``--data-root``, else the file's own folder."""
    return os.fspath(data_root) if data_root is not None else str(Path(path).parent)


def read_annotations(path: PathLike, data_root: Optional[PathLike], class_names: Sequence[str],
                     train: bool = True) -> List[Sample]:
    """Samples of an annotation file, by its name: a UCF101/HMDB51 official split file (see
    :func:`official_split`; HMDB51 takes the videos marked 1 when ``train``, else 2), .csv Kinetics, .json
    SSv2, anything else a list file (labels from 0)."""
    suffix = Path(path).suffix.lower()
    root = annotation_root(path, data_root)
    if official_split(path) is not None:
        return read_split_file(path, root, train=train, class_names=class_names)
    if suffix == ".csv":
        return read_kinetics_csv(path, root, class_names)
    if suffix == ".json":
        return read_ssv2_json(path, root, {n: i for i, n in enumerate(class_names)})
    return read_list_file(path, root)


def read_split(dataset: str, split_dir: PathLike, data_root: PathLike, split: int, train: bool,
               class_names: Optional[Sequence[str]] = None) -> List[Sample]:
    """Split ``split`` of the UCF101 / HMDB51 official split files in ``split_dir``."""
    if dataset == "ucf101":
        return read_ucf101(split_dir, data_root, split=split, train=train)
    if dataset == "hmdb51":
        return read_hmdb51(split_dir, data_root, split=split, train=train, class_names=class_names)
    raise UsageError(f"split files are read for ucf101 or hmdb51, not {dataset!r}")


def load_samples(path: PathLike, data_root: Optional[PathLike], class_names: Sequence[str], *, train: bool,
                 skip_missing: bool, what: str) -> Tuple[List[Sample], List[Dict[str, str]]]:
    """Read and check an annotation file: ``(kept samples, dropped missing files)``."""
    samples = read_annotations(path, data_root, class_names, train=train)
    return check_samples(samples, len(class_names), skip_missing=skip_missing, what=f"{what} {path}",
                         root=annotation_root(path, data_root))
