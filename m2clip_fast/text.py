"""Prompts, tokenisation, the label-word vocabulary, and CMLM masking.

Class names are turned into words ("ApplyEyeMakeup" → "apply eye makeup", "brush_hair" → "brush hair"),
placed into prompt templates ("a video of a person {}.") and tokenised with open_clip's BPE tokenizer.
For CMLM we tokenise word by word so each label word knows which BPE tokens it owns: open_clip's
SimpleTokenizer splits text on whitespace/punctuation before BPE, so per-word encoding concatenates
to exactly the tokens of the whole prompt (tested).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .errors import MissingFileError, UsageError

DEFAULT_TEMPLATES: Tuple[str, ...] = ("a video of a person {}.",)
# The official training and evaluation prompt: utils.text_prompt's only template ("text augmentation" of one),
# capitalised and without a period (the paper writes "a video of <y>").
OFFICIAL_TEMPLATES: Tuple[str, ...] = ("A video of {}",)

# Zero-shot prompt ensemble in the style of ActionCLIP / X-CLIP evaluation.
ZERO_SHOT_TEMPLATES: Tuple[str, ...] = (
    "a video of a person {}.",
    "a photo of a person {}.",
    "a person is {}.",
    "a video of {}.",
    "a clip of {}.",
    "a demonstration of {}.",
    "human action of {}.",
    "{}, an action.",
)

# kinetics600_new220: the 220 Kinetics-600 classes not in Kinetics-400 (K600 zero-shot; provenance in assets/)
SHIPPED_CLASS_LISTS = ("kinetics400", "ssv2", "ucf101", "hmdb51", "kinetics600_new220")

MASK_RATIO = 0.2
IGNORE_INDEX = -100
SPECIAL_WORDS: Tuple[str, ...] = ("[UNK]",)


def humanize(name: str) -> str:
    """A dataset class name as prompt words: 'ApplyEyeMakeup' → 'apply eye makeup', 'brush_hair' → 'brush hair',
    'hurling (sport)' → 'hurling sport'."""
    name = name.replace("_", " ")
    if " " not in name and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    # Brackets and commas are not words ("skiing (not slalom)" → "skiing not slalom"); apostrophes are.
    name = re.sub(r"[^\w\s']", " ", name)
    return " ".join(name.split()).lower()


def load_class_names(source: Union[str, Path, Sequence[str]]) -> List[str]:
    """Class names from a shipped list name (:data:`SHIPPED_CLASS_LISTS`), a file with one name per line (line
    i is label i; read by :func:`m2clip_fast.data.read_class_names`), a ViFi-CLIP label file ``*.csv``
    (``id,name``; :func:`m2clip_fast.data.splits.read_labels_csv`), or a sequence."""
    from .data.datasets import DatasetError, read_class_names
    from .data.splits import read_labels_csv

    if isinstance(source, (str, Path)) and str(source) in SHIPPED_CLASS_LISTS:
        return read_class_names(resources.files("m2clip_fast.assets").joinpath(f"{source}.txt"))
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise MissingFileError(
                f"class-name file {source} not found (or use one of the shipped lists: {', '.join(SHIPPED_CLASS_LISTS)})"
            )
        return read_labels_csv(source) if Path(source).suffix.lower() == ".csv" else read_class_names(source)
    names = [str(n).strip() for n in source]
    if not names or not all(names):
        raise DatasetError(f"class names must be non-empty strings, got {list(source)[:10]}")
    duplicates = sorted({n for i, n in enumerate(names) if n in names[:i]})
    if duplicates:
        raise DatasetError(f"duplicate class names: {duplicates[:10]}")
    return names


def label_words(class_names: Sequence[str]) -> List[str]:
    """The CMLM vocabulary: every word of the (humanised) class names, sorted, then the special words."""
    words = sorted({w for name in class_names for w in humanize(name).split()})
    return words + list(SPECIAL_WORDS)


def _split_template(template: str) -> Tuple[str, str]:
    if template.count("{}") != 1:
        raise UsageError(f"a prompt template needs exactly one '{{}}' placeholder, got {template!r}")
    prefix, suffix = template.split("{}")
    return prefix, suffix


@dataclass
class PromptTokens:
    """Tokenised prompts.

    tokens: (N, context_length) int64 BPE ids, SOT … EOT then zero padding.
    word_spans: per prompt, the [start, end) token positions of each label word, in order.
    used: the longest prompt's token count (SOT to EOT): columns from there on are all padding.
    """
    tokens: torch.Tensor
    word_spans: List[List[Tuple[int, int]]]
    used: int


class PromptTokenizer:
    """Builds prompt tokens word by word on top of an open_clip SimpleTokenizer."""

    def __init__(self, tokenizer, context_length: int = 77):
        for attr in ("encode", "sot_token_id", "eot_token_id"):
            if not hasattr(tokenizer, attr):
                raise TypeError(
                    f"{type(tokenizer).__name__} lacks '{attr}': CMLM needs open_clip's BPE SimpleTokenizer"
                )
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        # Masked BPE tokens become SOT: CLIP never sees it mid-sentence, so it carries no word
        # information, and it is below EOT so argmax pooling still finds the end of text.
        self.mask_token = self.sot

    def __call__(self, class_names: Sequence[str], template: str) -> PromptTokens:
        prefix, suffix = _split_template(template)
        prefix_ids, suffix_ids = self.tokenizer.encode(prefix), self.tokenizer.encode(suffix)
        rows, spans = [], []
        for name in class_names:
            ids, word_spans = [self.sot] + prefix_ids, []
            for word in humanize(name).split():
                piece = self.tokenizer.encode(word)
                word_spans.append((len(ids), len(ids) + len(piece)))
                ids += piece
            ids += suffix_ids + [self.eot]
            if len(ids) > self.context_length:
                raise UsageError(
                    f"prompt {template.format(humanize(name))!r} has {len(ids)} tokens, "
                    f"more than the context length {self.context_length}"
                )
            rows.append(ids)
            spans.append(word_spans)
        tokens = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return PromptTokens(tokens, spans, max((len(ids) for ids in rows), default=0))


@dataclass
class LabelWordTable:
    """The label words of N prompts as tensors, so that masking runs where the tokens are.

    spans: (N, W, 3) int64 [start, end, vocabulary index] of word j of prompt i, W the most words of any
    prompt; rows past a prompt's words are [0, 0, 0] (an empty span). counts: (N,) how many words of each
    prompt to mask: ``max(1, round(ratio · words))``, 0 for a prompt without words.
    """
    spans: torch.Tensor
    counts: torch.Tensor


def label_word_table(prompts: PromptTokens, words_per_prompt: Sequence[Sequence[int]],
                     ratio: float = MASK_RATIO) -> LabelWordTable:
    """words_per_prompt[i][j] is the vocabulary index of word j of prompt i (spans from ``prompts``)."""
    n, width = len(prompts.word_spans), max((len(s) for s in prompts.word_spans), default=0)
    spans = torch.zeros(n, max(width, 1), 3, dtype=torch.long)
    counts = torch.zeros(n, dtype=torch.long)
    for i, word_spans in enumerate(prompts.word_spans):
        for j, (start, end) in enumerate(word_spans):
            spans[i, j] = torch.tensor([start, end, words_per_prompt[i][j]])
        counts[i] = max(1, round(ratio * len(word_spans))) if word_spans else 0
    return LabelWordTable(spans, counts)


def mask_words(tokens: torch.Tensor, spans: torch.Tensor, counts: torch.Tensor, mask_token: int,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask ``counts[i]`` label words of row i, chosen uniformly at random; tensor ops only, on tokens'
    device, so a training step never waits on the host for it.

    tokens: (B, L); spans (B, W, 3) and counts (B,) rows of a :class:`LabelWordTable` (``generator``, when
    given, must be on tokens' device). Returns (masked tokens (B, L), labels (B, L)): labels hold the word's
    vocabulary index at every BPE position of a masked word and IGNORE_INDEX elsewhere.
    """
    start, end, vocab = spans.unbind(-1)
    is_word = end > start
    # A uniformly random subset of `count` words: the count smallest of uniform keys, non-words ranked last.
    keys = torch.rand(start.shape, device=tokens.device, generator=generator).masked_fill(~is_word, 2.0)
    chosen = keys.argsort(dim=1).argsort(dim=1) < counts[:, None]
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    covers = (pos >= start[..., None]) & (pos < end[..., None]) & chosen[..., None]  # (B, W, L)
    masked = covers.any(dim=1)
    labels = torch.where(masked, (covers * vocab[..., None]).sum(dim=1), IGNORE_INDEX)
    return tokens.masked_fill(masked, mask_token), labels
