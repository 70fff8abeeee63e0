"""The multi-task decoder's heads and losses: contrastive (KL), CMC, CMLM, VC.

Each loss takes logits, never probabilities. The official release feeds already-softmaxed scores into
cross entropy for CMC (a softmax of a softmax: the gradient all but vanishes); we don't.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import IGNORE_INDEX

DEFAULT_LOSS_WEIGHTS: Dict[str, float] = {"contrastive": 0.5, "cmc": 0.5, "vc": 1.0, "cmlm": 0.1}
HEADS = tuple(DEFAULT_LOSS_WEIGHTS)


def same_label_target(labels: torch.Tensor) -> torch.Tensor:
    """(B,) labels → (B, B) ActionCLIP target: softmax over 10·[label_i == label_j] per row."""
    positives = (labels[:, None] == labels[None, :]).float()
    return F.softmax(10.0 * positives, dim=1)


def kl_contrastive_loss(logits_per_video: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between softmax(logits) and the same-label target (ActionCLIP's KLLoss, batch-mean).

    logits_per_video: (B, B), τ-scaled cosine similarity of video i with the label text of sample j.
    """
    target = same_label_target(labels)

    def kl(logits):
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")

    return 0.5 * (kl(logits_per_video) + kl(logits_per_video.t()))


def cmc_loss(logits_per_class: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-modal classification: cross entropy over all C class texts. logits (B, C) = cos/τ."""
    return F.cross_entropy(logits_per_class, labels)


def vc_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Visual classification: cross entropy of the linear head's logits (B, C)."""
    return F.cross_entropy(logits, labels)


def cmlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Masked label-word prediction: logits (B, L, V), targets (B, L) with IGNORE_INDEX off the masks.

    The mean over masked positions, as a sum divided by their count computed on the device: branching on
    whether any position is masked would wait for the device every step. A batch with no masked word (every
    class name in it has no word to mask) has nothing to predict: its loss is 0/1, an exact 0 that is still
    part of the graph (a plain mean would give 0/0 = NaN), so backward and DDP's gradient reduction run as for
    any other step."""
    targets = targets.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class VisualClassifier(nn.Module):
    """VC head: dropout then Linear(vision width → C), weight init N(0, 0.02), bias 0.

    Input (B, width): ln_post of the time-averaged class token. Output (B, C) logits.
    """

    def __init__(self, width: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class MLMHead(nn.Module):
    """BERT-style prediction head: dense → GELU → LayerNorm → decoder to the label-word vocabulary.

    (B, L, width) → (B, L, V). Parameters: width²+width (dense) + 2·width (LayerNorm) + (width+1)·V.
    """

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size)
        for layer in (self.dense, self.decoder):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))
