"""``evaluate --report DIR``: where a model goes wrong, class by class.

Writes, from the same predictions the accuracy is computed from:

* ``per_class.csv``: per class, its videos and top-1 / top-5 accuracy of every head;
* ``confusion.csv``: the top-1 confusion counts of the main head (fused, or text for zero-shot), rows the true
  class, columns the predicted one, both in class order;
* ``confusion.png``: that matrix, rows normalised, classes sorted by accuracy (worst first), so that even 400
  classes read as a picture, beside the 30 most confused (true → predicted) pairs, which ``confused_pairs.csv``
  also lists;
* ``predictions.jsonl``: per video, its path, label and every head's top-5 ``{label, score}``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .evaluation import Predictions
from .predict import HEAD_ORDER, top_k

PAIRS = 30


# ----------------------------------------------------------------------------------------------- tables


def confusion_matrix(labels: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """int64 (C, C): entry [t, p] counts the videos of class t predicted as p."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def most_confused(matrix: np.ndarray, n: int = PAIRS) -> List[Tuple[int, int, int]]:
    """The ``n`` largest off-diagonal counts as ``(true, predicted, count)``, largest first (ties: class order)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.unravel_index(flat, off.shape))]
    return [pair for pair in pairs if pair[2] > 0]


def per_class_rows(probs: Dict[str, torch.Tensor], labels: torch.Tensor, class_names: Sequence[str]):
    """One dict per class: ``class``, ``name``, ``videos`` and ``top1_<head>`` / ``top5_<head>`` in %
    (empty for a class without videos)."""
    rows = [{"class": c, "name": name, "videos": int((labels == c).sum())} for c, name in enumerate(class_names)]
    for head, p in probs.items():
        top = p.topk(min(5, p.shape[1]), dim=1).indices
        hit1, hit5 = top[:, 0] == labels, (top == labels[:, None]).any(dim=1)
        for row in rows:
            mine = labels == row["class"]
            n = int(mine.sum())
            row[f"top1_{head}"] = f"{100.0 * int(hit1[mine].sum()) / n:.2f}" if n else ""
            row[f"top5_{head}"] = f"{100.0 * int(hit5[mine].sum()) / n:.2f}" if n else ""
    return rows


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------- figure


def confusion_png(path: Path, matrix: np.ndarray, class_names: Sequence[str], head: str) -> None:
    """Row-normalised confusion matrix with classes sorted by accuracy (worst first: the top-left corner is where
    the trouble is), tick labels only where they still fit, and the most confused pairs listed beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(class_names)
    support = matrix.sum(axis=1)
    accuracy = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)
    order = np.argsort(np.nan_to_num(accuracy, nan=2.0), kind="stable")
    rates = matrix[order][:, order] / np.maximum(support[order], 1)[:, None]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(17, 10), dpi=110, gridspec_kw={"width_ratios": [10, 7]})
    image = ax.imshow(rates, cmap="magma_r", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true class's videos")
    ticks = np.arange(0, c, max(1, int(np.ceil(c / 40))))  # at most 40 names per axis
    ax.set_xticks(ticks, [class_names[order[t]][:18] for t in ticks], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [class_names[order[t]][:18] for t in ticks], fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (sorted by accuracy, worst first)")
    ax.set_title(f"{head} head top-1 confusion, {c} classes, {int(support.sum())} videos", fontsize=10)
    side.axis("off")
    pairs = most_confused(matrix)
    lines = [f"{n:>4}  {100 * n / support[t]:5.1f}%  {class_names[t][:28]} → {class_names[p][:28]}"
             for t, p, n in pairs] or ["no confusions"]
    side.text(0, 1, f"the {len(pairs)} most confused pairs (count, share of the true class)\n\n" + "\n".join(lines),
              va="top", ha="left", family="monospace", fontsize=8, transform=side.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- report


def write_report(out: Path, predictions: Predictions, paths: Sequence[str], class_names: Sequence[str]) -> None:
    """The files of the module docstring for ``predictions`` (sample index → ({head: probs}, label)) of samples
    whose paths are ``paths`` (by sample index), over ``class_names``."""
    out.mkdir(parents=True, exist_ok=True)
    indices = sorted(predictions)
    labels = torch.tensor([predictions[i][1] for i in indices])
    heads = [h for h in HEAD_ORDER if h in predictions[indices[0]][0]]
    if "vc" not in heads:
        heads = ["text"]  # zero-shot: 'fused' is the text head itself
    probs = {h: torch.stack([predictions[i][0][h] for i in indices]) for h in heads}
    main = heads[0]

    rows = per_class_rows(probs, labels, class_names)
    _write_csv(out / "per_class.csv", list(rows[0]), [list(r.values()) for r in rows])
    matrix = confusion_matrix(labels.tolist(), probs[main].argmax(dim=1).tolist(), len(class_names))
    _write_csv(out / "confusion.csv", ["true \\ predicted", *class_names],
               [[name, *counts] for name, counts in zip(class_names, matrix.tolist())])
    pairs = most_confused(matrix)
    _write_csv(out / "confused_pairs.csv", ["true", "predicted", "count", "share_of_true"],
               [[class_names[t], class_names[p], n, f"{n / matrix[t].sum():.4f}"] for t, p, n in pairs])
    confusion_png(out / "confusion.png", matrix, class_names, main)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row, i in enumerate(indices):
            label = int(labels[row])
            record = {"path": paths[i], "label": label, "label_name": class_names[label],
                      "correct": bool(int(probs[main][row].argmax()) == label),
                      "predictions": top_k({h: p[row] for h, p in probs.items()}, class_names, 5)}
            f.write(json.dumps(record) + "\n")


def report_dir(base: Optional[str], split: Union[int, str, None]) -> Optional[Path]:
    """Where a report goes: ``DIR``, ``DIR/split_N`` for zero-shot split N (an int), or ``DIR/<split>`` for a
    named part (a str: "base", "2_shot"); None without ``--report``."""
    if base is None:
        return None
    if split is None:
        return Path(base)
    return Path(base) / (f"split_{split}" if isinstance(split, int) else split)
