"""``python -m m2clip_fast.demo``: the synthetic motion demo, end to end on a CPU.

1. writes the synthetic dataset (real H.264 files; classes visible only in motion) unless it exists;
2. trains the ``demo`` preset (a tiny frozen CLIP-like backbone + TED adapters);
3. evaluates on the held-out videos, prints top-1, and plots the training curves to a PNG.

With ``--no-adapters`` the same run has no temporal modelling (no TED or temporal adapters): single
frames carry no label, so it stays near chance — the contrast that is the method's point.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import train as train_module

CHANCE_CLASSES = 8


def plot_curves(run_dir: Path, png: Path, title: str) -> None:
    """Training loss per step and validation top-1 per epoch, from train_log.csv and metrics.jsonl."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(run_dir / "train_log.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "vc", "cmc", "contrastive", "cmlm"):
        if rows and key in rows[0]:
            ax_loss.plot(steps, [float(r[key]) for r in rows], label=key, linewidth=1.2 if key == "loss" else 0.8)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    epochs = [e["epoch"] + 1 for e in evals]
    for head in ("fused", "vc", "text"):
        ax_acc.plot(epochs, [e[f"top1_{head}"] for e in evals], marker="o", label=f"top-1 {head}")
    ax_acc.axhline(100 / CHANCE_CLASSES, color="grey", linestyle="--", label="chance")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation top-1 (%)")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2clip_fast.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="m2clip_demo/data", help="where the synthetic set is (or is written)")
    p.add_argument("--output-dir", default=None, help="run folder (default m2clip_demo/run or run_no_adapters)")
    p.add_argument("--no-adapters", action="store_true", help="disable TED and temporal adapters (the control)")
    p.add_argument("--per-class", type=int, default=48, help="training videos per class when writing the set")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)

    data = Path(args.data_dir)
    if not (data / "train.txt").is_file():
        from .data.synthetic import main as write_synthetic
        write_synthetic(["--out", str(data), "--seed", str(args.seed), "--per-class", str(args.per_class)])
    out = Path(args.output_dir or f"m2clip_demo/run{'_no_adapters' if args.no_adapters else ''}")
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run: its curves must not mix with an older one's
    if (out / "train_log.csv").exists():
        (out / "train_log.csv").unlink()
    overrides = list(args.set) + (["ted_adapters=False", "temporal_adapter=False"] if args.no_adapters else [])
    train_argv = ["--preset", "demo", "--train-list", str(data / "train.txt"), "--val-list", str(data / "val.txt"),
                  "--class-names", str(data / "classes.txt"), "--output-dir", str(out), "--seed", str(args.seed),
                  "--device", "cpu"]
    if args.epochs is not None:
        train_argv += ["--epochs", str(args.epochs)]
    if args.workers is not None:
        train_argv += ["--workers", str(args.workers)]
    if overrides:
        train_argv += ["--set", *overrides]
    start = time.perf_counter()
    metrics = train_module.train(train_module.parse_args(train_argv))
    minutes = (time.perf_counter() - start) / 60
    label = "without adapters" if args.no_adapters else "with TED adapters"
    png = out / "training_curves.png"
    plot_curves(out, png, f"synthetic motion demo, {label}")
    print(f"demo {label}: top-1 {metrics['top1']:.1f}% (fused; vc {metrics['top1_vc']:.1f}%, "
          f"text {metrics['top1_text']:.1f}%), chance {100 / CHANCE_CLASSES:.1f}%, trained in {minutes:.1f} min; "
          f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
