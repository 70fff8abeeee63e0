"""Prompt construction, vocabulary and CMLM masking."""
import open_clip
import pytest
import torch

from m2clip_fast.text import (IGNORE_INDEX, PromptTokenizer, humanize, label_word_table, label_words,
                              load_class_names, mask_words)


def mask_label_words(built, words, mask_token, ratio, generator=None):
    table = label_word_table(built, words, ratio)
    return mask_words(built.tokens, table.spans, table.counts, mask_token, generator)


@pytest.fixture(scope="module")
def prompts():
    return PromptTokenizer(open_clip.get_tokenizer("ViT-B-16"))


def test_humanize():
    assert humanize("ApplyEyeMakeup") == "apply eye makeup"
    assert humanize("brush_hair") == "brush hair"
    assert humanize("skiing (not slalom or crosscountry)") == "skiing not slalom or crosscountry"
    assert humanize("massaging person's head") == "massaging person's head"


def test_word_by_word_tokens_equal_open_clip_whole_prompt(prompts):
    names = ["massaging person's head", "ApplyEyeMakeup", "Putting something, something and something on the table"]
    built = prompts(names, "a video of a person {}.")
    reference = open_clip.get_tokenizer("ViT-B-16")([f"a video of a person {humanize(n)}." for n in names])
    assert torch.equal(built.tokens, reference)
    assert [len(s) for s in built.word_spans] == [3, 3, 8]
    assert built.used == max(len(row.nonzero()) for row in built.tokens)  # SOT … EOT, no zero inside


def test_masking_masks_at_least_one_word_and_labels_its_tokens(prompts):
    names = ["abseiling", "playing bass guitar", "massaging person's head"]
    built = prompts(names, "a video of a person {}.")
    vocab = label_words(names)
    words = [[vocab.index(w) for w in humanize(n).split()] for n in names]
    tokens, labels = mask_label_words(built, words, prompts.mask_token, 0.2, torch.Generator().manual_seed(0))
    for i, spans in enumerate(built.word_spans):
        masked = labels[i] != IGNORE_INDEX
        assert masked.any()
        assert torch.all(tokens[i][masked] == prompts.mask_token)
        assert torch.equal(tokens[i][~masked], built.tokens[i][~masked])
        masked_words = {int(v) for v in labels[i][masked]}
        assert masked_words <= set(words[i]) and len(masked_words) == max(1, round(0.2 * len(spans)))


def test_masking_draws_every_word(prompts):
    """Two of eight words per draw, chosen uniformly: over 400 draws each word is masked 100 times on average
    (binomial sd ~8.7), so a count under 50 means the choice is not uniform."""
    name = "Putting something, something and something on the table"
    built = prompts([name] * 400, "a video of a person {}.")
    vocab = label_words([name])
    words = [[vocab.index(w) for w in humanize(name).split()]] * 400
    _, labels = mask_label_words(built, words, prompts.mask_token, 0.2, torch.Generator().manual_seed(1))
    starts = [start for start, _ in built.word_spans[0]]
    hits = (labels[:, starts] != IGNORE_INDEX).sum(dim=0)
    assert hits.sum() == 2 * 400 and hits.min() > 50


def test_shipped_class_lists():
    sizes = {"kinetics400": 400, "ssv2": 174, "ucf101": 101, "hmdb51": 51}
    for name, size in sizes.items():
        assert len(load_class_names(name)) == size
    assert load_class_names("kinetics400")[0] == "abseiling"


def test_class_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_class_names(tmp_path / "missing.txt")
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicate class name"):
        load_class_names(dup)


def test_a_prompt_without_label_words_gets_no_target_and_the_others_still_do(prompts):
    """A class name of punctuation only ("??") has no word: its prompt stays as it is, with no target, instead
    of failing every training batch that holds it."""
    names = ["??", "playing bass guitar"]
    built = prompts(names, "a video of a person {}.")
    assert built.word_spans[0] == []
    vocab = label_words(names)
    words = [[vocab.index(w) for w in humanize(n).split()] for n in names]
    tokens, labels = mask_label_words(built, words, prompts.mask_token, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(tokens[0], built.tokens[0]) and (labels[0] == IGNORE_INDEX).all()
    assert (labels[1] != IGNORE_INDEX).any()
