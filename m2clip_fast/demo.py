"""``python -m m2clip_fast.demo``: the synthetic motion demo, end to end on a CPU.

1. writes the synthetic dataset (real H.264 files; classes visible only in motion) unless the data folder
   already holds the one this run asks for (its ``meta.json`` records the seed and count); another set there
   is rewritten in place;
2. trains the ``demo`` preset (a tiny frozen CLIP-like backbone + TED adapters) in the output folder,
   after deleting what an earlier run left there (logs, skipped list, checkpoints, curves);
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
from typing import Any, List, Optional

from . import run_dir, train as train_module
from .cli import int_at_least, run_main
from .data.datasets import DatasetError
from .data.synthetic import CLASSES, dataset_meta, make_dataset, read_meta

CHANCE_CLASSES = 8
PROG = "python -m m2clip_fast.demo"



def prepare_data(data: Path, **params: Any) -> str:
    """Make ``data`` hold the synthetic set ``make_dataset(data, **params)`` writes; returns what was done.

    Kept when ``data/meta.json`` records exactly these parameters; otherwise written, or rewritten in
    place when the folder holds another synthetic set (other parameters, or one from before meta.json).
    A folder with annotation lists the generator did not write is refused with ValueError, never
    overwritten: the demo's --data-dir may be mistyped as a real dataset's.
    """
    wanted = dataset_meta(**params)
    held = read_meta(data)
    if held == wanted:
        return f"using the synthetic set in {data} (seed {wanted['seed']}, {wanted['per_class']} per class)"
    lists = [name for name in ("train.txt", "val.txt") if (data / name).exists()]
    if held is None and lists and not _holds_motion_classes(data):
        raise DatasetError(f"{data} holds {' and '.join(lists)} but no synthetic set (no meta.json, and classes.txt "
                         f"does not list the motion classes): pass another --data-dir")
    if held is not None:
        changed = ", ".join(f"{k} {held.get(k)} -> {v}" for k, v in wanted.items() if held.get(k) != v)
        action = f"rewrote the synthetic set in {data} ({changed})"
    elif lists:
        action = f"rewrote the synthetic set in {data} (it had no meta.json: written by an older version)"
    else:
        action = f"wrote the synthetic set to {data}"
    make_dataset(data, **params)
    return action


def _holds_motion_classes(data: Path) -> bool:
    try:
        return (data / "classes.txt").read_text(encoding="utf-8").split() == list(CLASSES)
    except OSError:
        return False


def clear_previous_run(out: Path) -> List[Path]:
    """Delete what an earlier training run left in ``out``; returns the deleted files.

    train appends to its logs and keeps best.pt unless beaten, so without this a new demo run's curves,
    skipped list and best checkpoint would mix with the old run's (and TensorBoard would show both).
    """
    return run_dir.delete_files(run_dir.run_outputs(out) + [out / "training_curves.png"])


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
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="m2clip_demo/data",
                   help="where the synthetic set is written; rewritten when it holds another --seed / --per-class")
    p.add_argument("--output-dir", default=None, help="run folder (default m2clip_demo/run or run_no_adapters); "
                                                      "an earlier run's logs and checkpoints there are deleted")
    p.add_argument("--no-adapters", action="store_true", help="disable TED and temporal adapters (the control)")
    p.add_argument("--per-class", type=int_at_least(1), default=48, help="training videos per class in the set")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds both the synthetic set and training")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    return run_main(lambda: _run(args), PROG)


def _run(args: argparse.Namespace) -> int:
    data = Path(args.data_dir)
    print(prepare_data(data, seed=args.seed, per_class=args.per_class))
    out = Path(args.output_dir or f"m2clip_demo/run{'_no_adapters' if args.no_adapters else ''}")
    if clear_previous_run(out):
        print(f"deleted the previous run's logs and checkpoints in {out}")
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
