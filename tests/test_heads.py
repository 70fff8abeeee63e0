"""Each loss against a value computed by hand from its definition."""
import math

import pytest
import torch

from m2clip_fast.heads import MLMHead, cmc_loss, cmlm_loss, kl_contrastive_loss, same_label_target, vc_loss
from m2clip_fast.text import IGNORE_INDEX


def test_cmc_is_cross_entropy_of_logits_not_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    row0 = -(2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0)))
    row1 = -(0.0 - math.log(math.exp(0.5) + math.exp(1.5) + 1))
    assert cmc_loss(logits, labels).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert vc_loss(logits, labels).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_contrastive_kl_hand_computed():
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([4, 9])  # different labels: target = softmax([10, 0]) per row
    t_hi = math.exp(10) / (math.exp(10) + 1)
    target = [[t_hi, 1 - t_hi], [1 - t_hi, t_hi]]

    def kl(rows):
        total = 0.0
        for i, row in enumerate(rows):
            lse = math.log(sum(math.exp(v) for v in row))
            total += sum(target[i][j] * (math.log(target[i][j]) - (row[j] - lse)) for j in range(2))
        return total / len(rows)

    rows = logits.tolist()
    cols = logits.t().tolist()
    assert kl_contrastive_loss(logits, labels).item() == pytest.approx(0.5 * (kl(rows) + kl(cols)), rel=1e-5)


def test_same_label_pairs_are_positive():
    target = same_label_target(torch.tensor([1, 1, 2]))
    assert target[0, 1] == pytest.approx(target[0, 0]) and target[0, 2] < 1e-4
    torch.testing.assert_close(target.sum(1), torch.ones(3))


def test_cmlm_loss_only_counts_masked_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    targets = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    expected = -(2.0 - math.log(math.exp(2.0) + 3))
    assert cmlm_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_cmlm_loss_without_any_masked_word_is_a_zero_in_the_graph():
    """A batch whose class names have no word to mask: 0, not cross entropy's 0/0 = NaN nor an error that
    stops training; still connected to the logits so backward (and DDP) run as on any step."""
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = cmlm_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mlm_head_parameter_count_matches_official_formula():
    head = MLMHead(512, 520)
    assert sum(p.numel() for p in head.parameters()) == 263_680 + 513 * 520
