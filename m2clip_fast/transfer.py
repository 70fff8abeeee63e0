"""Transfer-protocol scores, from the metrics of each evaluated list: mean ± std over splits (zero-shot), the
harmonic mean of base and novel accuracy (base-to-novel), a row per shot count (few-shot), and their text.

The protocols are those X-CLIP and ViFi-CLIP made standard:

* zero-shot: the text head over the target classes' names; top-1 / top-5 per split, then mean ± std over the
  splits (the population std, over the 3 splits; K600: the three 160-class splits of the 220 new classes);
* few-shot: a model trained on K videos per class (K = 2, 4, 8, 16), scored on the full test list;
* base-to-novel: a model trained on the base classes, scored on the base test videos with the base class
  names and on the novel test videos with the novel class names (the text head over only that subset's
  names), and HM = 2·base·novel / (base + novel).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple

from .errors import UsageError

HEADS = ("vc", "text", "fused")


def harmonic_mean(base: float, novel: float) -> float:
    """2·b·n / (b + n) of two accuracies (any unit, both ≥ 0); 0 when both are 0 (the limit as they go to 0)."""
    if not (math.isfinite(base) and math.isfinite(novel)) or base < 0 or novel < 0:
        raise UsageError(f"the harmonic mean needs two finite accuracies >= 0, got {base} and {novel}")
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """``(mean, population std)`` of the per-split values; std 0 for a single split."""
    if not values:
        raise UsageError("mean ± std of no values")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def split_summary(per_split: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """``top1_mean``, ``top1_std``, ``top5_mean``, ``top5_std`` over splits that each hold ``top1``, ``top5``."""
    out: Dict[str, float] = {}
    for k in ("top1", "top5"):
        out[f"{k}_mean"], out[f"{k}_std"] = mean_std([s[k] for s in per_split])
    return out


def base_to_novel_summary(base: Dict[str, Any], novel: Dict[str, Any]) -> Dict[str, float]:
    """Text-head top-1 / top-5 of the base and novel evaluations and their harmonic means."""
    out = {f"{subset}_{k}": metrics[f"{k}_text"] for subset, metrics in (("base", base), ("novel", novel))
           for k in ("top1", "top5")}
    out["hm_top1"] = harmonic_mean(out["base_top1"], out["novel_top1"])
    out["hm_top5"] = harmonic_mean(out["base_top5"], out["novel_top5"])
    return out


def format_base_to_novel(result: Dict[str, Any]) -> List[str]:
    lines = [f"base-to-novel ({result['views']} views; text head over each subset's class names):"]
    for subset in ("base", "novel"):
        s = result[subset]
        lines.append(f"  {subset:<5} top-1 {result[f'{subset}_top1']:.2f}%  top-5 {result[f'{subset}_top5']:.2f}%  "
                     f"({s['num_classes']} classes, {s['num_samples']} videos)")
    lines.append(f"  HM    top-1 {result['hm_top1']:.2f}%  top-5 {result['hm_top5']:.2f}%")
    return lines


def format_few_shot(result: Dict[str, Any]) -> List[str]:
    lines = [f"few-shot on {result['val_list']} ({result['views']} views):"]
    for row in result["shots"]:
        heads = "  ".join(f"{h} top-1 {row[f'top1_{h}']:.2f}%" for h in HEADS if f"top1_{h}" in row)
        lines.append(f"  K={row['shots']:<3} {heads}  ({row['num_samples']} videos)")
    return lines
