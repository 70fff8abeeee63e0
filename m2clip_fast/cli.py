"""What every command-line entry point shares: one-line errors for bad input, checkpoint reading and
argparse types for counts.

A user who passes a wrong path or a malformed file should read one line naming the problem, not a
traceback from deep inside torch; ``M2CLIP_DEBUG=1`` brings the traceback back for bug reports.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

# Exceptions that carry a message meant for the user: bad paths, malformed files, invalid options.
# Anything else is a bug in m2clip-fast and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               FileExistsError)


class CheckpointError(ValueError):
    """A file that should be a checkpoint is missing, truncated, or not a checkpoint at all."""


def run_main(main: Callable[[], int], prog: str, on_interrupt: Optional[Callable[[], str]] = None) -> int:
    """Run a CLI body: user errors print ``prog: error: …`` and return 2, Ctrl-C returns 130.

    ``on_interrupt`` may return a hint to print on Ctrl-C (e.g. how to resume).
    """
    try:
        return main()
    except KeyboardInterrupt:
        hint = on_interrupt() if on_interrupt is not None else ""
        print(f"\n{prog}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("M2CLIP_DEBUG") == "1":
            raise
        print(f"{prog}: error: {exc}\n(set M2CLIP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def load_checkpoint_file(path: Union[str, Path], what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """torch.load of a file we expect to be a checkpoint, with errors that say what is wrong with it.

    Tries ``weights_only=True`` first (tensors, containers, numbers: no code runs while unpickling);
    checkpoints that hold other objects (our RNG state, some official checkpoints' argparse
    namespaces) need the full unpickler, which runs only on files the user chose to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise _unreadable(path, what, exc) from exc
    except Exception as exc:  # the weights-only unpickler fails on junk with KeyError, EOFError, ...
        raise _unreadable(path, what, exc) from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise _unreadable(path, what, exc) from exc


def _unreadable(path: Path, what: str, exc: BaseException) -> CheckpointError:
    text = str(exc).strip()
    first = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, or another kind of "
                           f"file?): {first}")


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
