"""The ablation's report: mean ± std over seeds, the Markdown tables (``ablation.md``) and the bar chart
(``ablation.png``), with the machine and the time the run took."""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .data.synthetic import CLASSES

CHANCE = 100 / len(CLASSES)  # the synthetic set's classes
HEADS = ("text", "vc", "fused")


@dataclass
class Row:
    """One table row: its runs (one result per seed: ``seed`` and ``top1_text/vc/fused``), the head it is
    scored by, whether its VC head was trained, and the paper's K400 top-1 for the same row (None: no such row)."""

    label: str
    config: str
    head: str
    vc_trained: bool
    results: List[Dict[str, Any]]
    paper: Optional[float]

    def top1(self, head: Optional[str] = None) -> List[float]:
        """Top-1 (%) of ``head`` (default: the scored head), seed by seed."""
        return [r[f"top1_{head or self.head}"] for r in self.results]


Table = Tuple[str, List[Row]]


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n − 1 in the denominator); the deviation is None for one value."""
    if not values:
        raise ValueError("no values to average")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(values: Sequence[float]) -> str:
    """'81.2 ± 3.4' (one value: '81.2')."""
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def machine() -> str:
    """'CPU model (its widest x86 vector extension), N cores available, OS, Python, torch and its thread count'
    of this machine, from lscpu."""
    import torch

    model, flags = platform.processor() or "unknown CPU", []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "Flags":
            flags = value.split()
    vector = ("AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}{f' ({vector})' if vector else ''}, {cores} cores available, {platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} (threads: {torch.get_num_threads()})")


def ordering(rows: Sequence[Row], values) -> str:
    """The rows by ``values(row)``, highest first: 'TE + TD (83.4) > TE only (83.1) = TD only (83.1)'
    (equal as printed, to one decimal: '=')."""
    ranked = sorted(((round(values(r), 1), r.label) for r in rows), key=lambda x: -x[0])
    text = f"{ranked[0][1]} ({ranked[0][0]:.1f})"
    for (before, _), (v, label) in zip(ranked, ranked[1:]):
        text += f" {'=' if v == before else '>'} {label} ({v:.1f})"
    return text


def _cell(row: Row, head: str) -> str:
    if head in ("vc", "fused") and not row.vc_trained:
        return "— (VC untrained)"
    return format_mean_std(row.top1(head))


def table_markdown(title: str, rows: Sequence[Row]) -> List[str]:
    """The table's Markdown lines, then the measured and the paper's ordering."""
    lines = [f"## {title}", "",
             "| row | change to the demo preset | top-1 % (mean ± std) | scored head | per seed | text | VC | fused "
             "| paper, K400 top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ", ".join(f"{v:.1f}" for v in r.top1())
        lines.append(f"| {r.label} | {r.config or 'none'} | **{format_mean_std(r.top1())}** | {r.head} | {seeds} | "
                     f"{' | '.join(_cell(r, h) for h in HEADS)} | {'—' if r.paper is None else f'{r.paper:.1f}'} |")
    lines += ["", f"Measured: {ordering(rows, lambda r: mean_std(r.top1())[0])}."]
    with_paper = [r for r in rows if r.paper is not None]
    if with_paper:
        lines.append(f"Paper: {ordering(with_paper, lambda r: r.paper)}.")
    return lines + [""]


def te_td_note(rows: Sequence[Row]) -> str:
    """What the TE-only and TD-only rows show against the paper (which has TE ahead); '' without both rows."""
    by_label = {r.label: mean_std(r.top1())[0] for r in rows}
    if "TE only" not in by_label or "TD only" not in by_label:
        return ""
    te, td = round(by_label["TE only"], 1), round(by_label["TD only"], 1)
    if te == td:
        return f"TE alone and TD alone tie here ({te:.1f}%); the paper has TE ahead (TE 83.1%, TD 81.8% on K400)."
    if td > te:
        return (f"TD alone beats TE alone here ({td:.1f}% against {te:.1f}%), the reverse of the paper's order "
                f"(TE 83.1%, TD 81.8% on K400). On this set the label is in the motion only, and every video has "
                f"its own random background and colours: the frame difference TD reads (x_t − x_{{t−1}} of the "
                f"patch tokens) is the signal itself, with the static texture already cancelled, while TE's "
                f"depthwise convolution over time on every token has to learn to take that difference. On "
                f"Kinetics, where appearance carries much of the label, TE's smoothing of all tokens helps more.")
    return (f"TE alone beats TD alone here ({te:.1f}% against {td:.1f}%), the paper's order (TE 83.1%, TD 81.8% "
            f"on K400).")


def load_reading(load: Sequence[Sequence[float]], cores: int) -> str:
    """What the 1-minute load averages at the start and end of the command say about its wall time."""
    if max(sample[0] for sample in load) > cores:
        return "above the core count, other jobs shared the CPU and the wall time is inflated by them."
    return f"not above the {cores} cores: no other job competed for them."


def report_markdown(tables: Sequence[Table], settings: Sequence[str], timing: Dict[str, Any], command: str,
                    when: datetime.datetime, machine_line: str) -> str:
    """The whole of ablation.md."""
    load = timing["load"]
    lines = ["# The paper's ablations on the synthetic motion set", "",
             f"Produced by `{command}` on {when:%Y-%m-%d %H:%M} UTC.", "",
             f"Machine: {machine_line}.", "",
             f"Time: {timing['wall_s'] / 60:.1f} min wall for the whole command ({timing['train_s'] / 60:.1f} min of "
             f"it training, summed over the runs; {timing['reused']} of {timing['runs']} runs reused from an earlier "
             f"invocation, their training time included in the sum), {timing['cpu_s'] / 60:.1f} min of CPU time "
             f"(this process and its loader workers). Load average (1 min) {load[0][0]:.1f} at the start and "
             f"{load[1][0]:.1f} at the end: {load_reading(load, os.cpu_count() or 1)}", "", "Settings:", ""]
    lines += [f"- {s}" for s in settings] + [""]
    for title, rows in tables:
        lines += table_markdown(title, rows)
        note = te_td_note(rows)
        if note:
            lines += [note, ""]
    return "\n".join(lines)


def plot(tables: Sequence[Table], png: Path, title: str) -> None:
    """One panel per table: the scored head's mean top-1 as bars, the seeds' standard deviation as error bars,
    each seed as a dot, chance as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.2), squeeze=False)
    for ax, (table_title, rows) in zip(axes[0], tables):
        stats = [mean_std(r.top1()) for r in rows]
        x = range(len(rows))
        ax.bar(x, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], capsize=5, color="#7aa6c2",
               edgecolor="#2f5d7c")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r.results), r.top1(), "o", color="#1b3a4f", markersize=3.5, zorder=3)
            ax.annotate(f"{stats[i][0]:.1f}", (i, min(stats[i][0] + (stats[i][1] or 0.0) + 2, 97)), ha="center",
                        fontsize=8)
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label=f"chance ({CHANCE:.1f}%)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([r.label for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(table_title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(tables: Sequence[Table], settings: Sequence[str], timing: Dict[str, Any], command: str,
                 report_dir: Path) -> Tuple[Path, Path]:
    """Write ``report_dir/ablation.md`` and ``ablation.png``; returns their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    md, png = report_dir / "ablation.md", report_dir / "ablation.png"
    when = datetime.datetime.now(datetime.timezone.utc)
    seeds = sorted({r["seed"] for _, rows in tables for row in rows for r in row.results})
    plot(tables, png, f"synthetic motion set, demo preset: mean ± std over seeds {', '.join(map(str, seeds))}")
    text = report_markdown(tables, settings, timing, command, when, machine())
    md.write_text(text + f"\n![ablation bar chart]({png.name})\n", encoding="utf-8")
    return md, png
