"""The bad-sample policy every clip loader follows: a video that cannot be read is replaced by another
sample along a deterministic chain, and reported with a short reason; an item whose whole chain (up to
``max_attempts`` samples) fails takes the place of a readable item of its batch (:func:`fill_failed`); the
training loop stops only when too much of the dataset is unreadable (:func:`check_bad_fraction`).

Only failures that belong to the file are skips: a :class:`VideoDecodeError` (the decode backends turn
whatever an odd file makes them raise into one) and a MemoryError (an absurd frame size, met by decoding or
by transforming the frames). Anything else our sampling or transforms raise is a bug or a wrong setting,
and stops the run with its traceback instead of turning every sample into a skip.
"""
from __future__ import annotations

from functools import lru_cache
from math import gcd
from typing import Dict, List, Optional, Sequence, TypeVar

from .datasets import DatasetError
from .errors import VideoDecodeError, short_text

# what a sample may raise for its file alone (see the module docstring)
SAMPLE_ERRORS = (VideoDecodeError, MemoryError)

# 1 - 1/golden ratio: multiples of it mod 1 are the most evenly spread sequence there is (three-distance
# theorem), so k * stride mod n jumps far from item i at every attempt, never along a run of neighbours
GOLDEN_FRACTION = 0.3819660112501051


@lru_cache(maxsize=64)
def replacement_stride(n: int) -> int:
    """The chain's step for ``n`` samples: coprime to ``n``, so that attempts 0..n-1 visit n distinct samples,
    and the coprime integer nearest to ``n * GOLDEN_FRACTION`` that is neither 1 nor n - 1 (a fixed prime
    step such as 7919 is ±1 mod n for n = 40, 80, 7920, ...: the chain then walks along neighbours, which a
    folder of bad files fills). n <= 4 has no such step; 1 visits every sample there too."""
    centre = round(n * GOLDEN_FRACTION)
    for distance in range(n):
        for step in (centre + distance, centre - distance):
            if 1 < step < n - 1 and gcd(step, n) == 1:
                return step
    return 1


def replacement_index(i: int, k: int, n: int) -> int:
    """The sample tried at attempt ``k`` (0: ``i`` itself) for item ``i`` of ``n`` samples: distinct for
    k = 0, ..., n - 1."""
    return (i + k * replacement_stride(n)) % n


Item = TypeVar("Item")


def fill_failed(items: Sequence[Optional[Item]], failures: Sequence[str]) -> List[Item]:
    """A batch's items with those whose every attempt failed (None) replaced by the batch's readable ones, in
    turn, so the batch stays full; ``failures`` (what was tried) names the files when no item is readable."""
    good = [item for item in items if item is not None]
    if not good:
        raise DatasetError(f"every item of a batch of {len(items)} failed, replacements included: "
                           f"{'; '.join(failures[:5])}{' ...' if len(failures) > 5 else ''}")
    return [item if item is not None else good[pos % len(good)] for pos, item in enumerate(items)]


def check_bad_fraction(bad: Dict[str, str], num_samples: int, limit: float, what: str) -> None:
    """Stop the run when more than ``limit`` (a fraction) of the ``num_samples`` samples of ``what`` (e.g.
    "epoch 3's training videos") were unreadable: ``bad`` maps each distinct unreadable file to its reason."""
    if len(bad) > limit * num_samples:
        example = "; ".join(f"{p}: {r}" for p, r in sorted(bad.items())[:3])
        raise DatasetError(f"{len(bad)} of {num_samples} {what} ({100 * len(bad) / num_samples:.0f}%) are "
                           f"unreadable, more than train.max_bad_fraction={limit:g} allows; e.g. {example}")


def skip_reason(exc: BaseException) -> str:
    """A skipped video's reason in a few words: the VideoDecodeError's own, else the exception's
    type and message (an unexpected error stays recognisable in ``skipped.jsonl``)."""
    if isinstance(exc, VideoDecodeError):
        return exc.reason
    text = short_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

