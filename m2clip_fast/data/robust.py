"""The bad-sample policy every clip loader follows: a video that cannot be read is replaced by another
sample along a deterministic chain, and reported with a short reason.

Only failures that belong to the file are skips: a :class:`VideoDecodeError` (the decode backends turn
whatever an odd file makes them raise into one) and a MemoryError (an absurd frame size, met by decoding or
by transforming the frames). Anything else our sampling or transforms raise is a bug or a wrong setting,
and stops the run with its traceback instead of turning every sample into a skip.
"""
from __future__ import annotations

from .errors import VideoDecodeError, short_text

# Replacements for item i are tried at (i + k * REPLACEMENT_STEP) % n, k = 1, 2, ...: a prime
# step scatters them over the dataset (a run of bad files in one folder does not make every
# neighbour fail the same way) and visits every sample when n is not a multiple of it.
REPLACEMENT_STEP = 7919

# what a sample may raise for its file alone (see the module docstring)
SAMPLE_ERRORS = (VideoDecodeError, MemoryError)


def replacement_index(i: int, k: int, n: int) -> int:
    """The sample tried at attempt ``k`` (0: ``i`` itself) for item ``i`` of ``n`` samples."""
    step = REPLACEMENT_STEP if n % REPLACEMENT_STEP else REPLACEMENT_STEP + 2  # 7921 = 89^2
    return (i + k * step) % n


def skip_reason(exc: BaseException) -> str:
    """A skipped video's reason in a few words: the VideoDecodeError's own, else the exception's
    type and message (an unexpected error stays recognisable in ``skipped.jsonl``)."""
    if isinstance(exc, VideoDecodeError):
        return exc.reason
    text = short_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

