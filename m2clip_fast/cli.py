"""What every command-line entry point shares: one-line errors for bad input, and the argparse types and
argument groups of more than one command.

A user who passes a wrong path or a malformed file should read one line naming the problem, not a
traceback from deep inside torch; ``M2CLIP_DEBUG=1`` brings the traceback back for bug reports.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Tuple

from .data.loader import parse_views
from .errors import UserError

def run_main(main: Callable[[], int], prog: str, on_interrupt: Optional[Callable[[], str]] = None) -> int:
    """Run a CLI body: user errors (:class:`~m2clip_fast.errors.UserError`: bad paths, malformed files,
    invalid options) print ``prog: error: …`` and return 2, Ctrl-C returns 130. Any other exception is a bug
    in m2clip-fast (or torch's), and keeps its traceback.

    ``on_interrupt`` may return a hint to print on Ctrl-C (e.g. how to resume).
    """
    try:
        return main()
    except KeyboardInterrupt:
        hint = on_interrupt() if on_interrupt is not None else ""
        print(f"\n{prog}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except UserError as exc:
        if os.environ.get("M2CLIP_DEBUG") == "1":
            raise
        print(f"{prog}: error: {user_message(exc)}\n(set M2CLIP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def user_message(exc: BaseException) -> str:
    """A user error's message. One a DataLoader worker raised arrives re-raised with the worker's whole
    traceback as its text ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): only
    the original message, after the traceback's last 'module.Type: ', is kept."""
    text = str(exc)
    if "Original Traceback" in text:
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        at = text.rfind(marker)
        text = text[at + len(marker):] if at >= 0 else text.rstrip().splitlines()[-1]
    return text.rstrip()


# ------------------------------------------------------------------------------------------ argparse types


def int_at_least(minimum: int, even: bool = False) -> Callable[[str], int]:
    """argparse type: an int >= ``minimum`` (and even, for video sizes), so a bad count fails as a usage
    error naming the option rather than deep inside numpy or torch."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if even and value % 2:
            raise argparse.ArgumentTypeError(f"must be even (yuv420p video), got {value}")
        return value
    return parse


def shard_arg(text: str) -> Tuple[int, int]:
    """argparse type: 'i/N' with 0 <= i < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= i < N, got {text}")
    return i, n


def views_arg(text: str) -> str:
    """argparse type: CLIPSxCROPS, checked by :func:`~m2clip_fast.data.loader.parse_views` before anything
    is built."""
    try:
        parse_views(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def splits_arg(text: str) -> List[int]:
    """argparse type: official split numbers, e.g. '1,2,3' → [1, 2, 3]."""
    try:
        splits = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected split numbers like 1,2,3, got {text!r}") from None
    if not splits or any(s not in (1, 2, 3) for s in splits) or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"splits are 1, 2 and/or 3 (each once), got {text!r}")
    return splits


# ------------------------------------------------------------------------------------------ argument groups

ANNOTATION_HELP = (
    "annotations, by file name: an mmaction2 list .txt ('relative/path label', labels from 0), a Kinetics .csv "
    "(videos ROOT/<label>/ID_START_END.mp4 or ROOT/ID_START_END.mp4, detected), an SSv2 .json (ROOT/ID.webm), "
    "a UCF101 trainlist0N.txt / testlist0N.txt (classInd.txt next to it; videos ROOT/Class/v_*.avi) or any "
    "HMDB51 <class>_test_splitN.txt (split N of its folder; videos ROOT/<class>/*.avi)")


def add_data_args(parser: argparse.ArgumentParser, train: bool) -> None:
    """The data options of ``train`` and ``evaluate``."""
    g = parser.add_argument_group("data")
    if train:
        g.add_argument("--train-list", help=f"training {ANNOTATION_HELP}")
        g.add_argument("--val-list", help="validation annotations (same formats; HMDB51: the videos marked 2)")
    else:
        g.add_argument("--val-list", help=f"evaluation {ANNOTATION_HELP}")
    g.add_argument("--data-root", default=None,
                   help="ROOT, the folder the annotation paths are relative to; default, for every format: the "
                        "annotation file's own folder (give it when the videos live elsewhere, e.g. "
                        "k400/videos for k400/train.csv)")
    g.add_argument("--class-names", default=None, help="class-name file, one per line (line i = label i)")
    g.add_argument("--decoder", choices=("auto", "pyav", "torchcodec", "dali"), default="auto",
                   help="video decoder: auto = DALI on CUDA when installed, else PyAV; torchcodec: CPU decoding "
                        "with torchcodec where it gives PyAV's frames, PyAV elsewhere")
    g.add_argument("--skip-missing", action="store_true",
                   help="drop missing files (listed in skipped.jsonl) instead of stopping before the run; "
                        "unreadable or empty files are always replaced during training and left out of evaluation")
    g.add_argument("--workers", type=int_at_least(0), default=None, help="DataLoader workers per process")
