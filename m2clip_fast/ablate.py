"""``python -m m2clip_fast.ablate``: the paper's ablations on the synthetic motion set, where only motion
carries the label.

Table 5 (the TED adapter's branches: none, TE only, TD only, TE+TD) and Table 7 (the decoder's heads, added
one at a time: contrastive, +CMC, +CMLM, +VC) are trained with the ``demo`` preset, each for several seeds,
on one synthetic set written once (``m2clip_fast.demo.prepare_data``). TE+TD with every head is both
Table 5's last row and Table 7's: trained once. The table goes to ``docs/ablation.md``, the bar chart to
``docs/ablation.png`` (``--report-dir``).

Every run has its own folder, ``OUTPUT/runs/VARIANT_seedS``. A run whose ``result.json`` records the same
settings is reused; one that stopped in the middle continues from its last checkpoint (train ``--resume``),
so an interrupted ablation picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import ablation_report, train as train_module
from .cli import int_at_least, run_main
from .data.synthetic import CLASSES
from .demo import prepare_data
from .errors import UsageError
from .heads import DEFAULT_LOSS_WEIGHTS

PROG = "python -m m2clip_fast.ablate"
RESULT = "result.json"
SPEC = "ablation_spec.json"  # what a run folder is training, and the seconds spent on it so far


@dataclass(frozen=True)
class Variant:
    """One configuration of the ablation: ``model`` holds the config keys it changes in the demo preset."""

    name: str
    label: str
    model: Dict[str, Any] = field(default_factory=dict)

    @property
    def overrides(self) -> List[str]:
        """``model`` as train's ``--set`` items."""
        return [f"{key}={value!r}" for key, value in self.model.items()]

    @property
    def trained_heads(self) -> Tuple[str, ...]:
        """The heads with a non-zero loss weight in this variant."""
        weights = {**DEFAULT_LOSS_WEIGHTS, **self.model.get("loss_weights", {})}
        return tuple(h for h in DEFAULT_LOSS_WEIGHTS if weights[h] > 0)


def heads_only(*heads: str) -> Dict[str, Dict[str, float]]:
    """The ``loss_weights`` change that keeps ``heads`` at their default weights and turns the others off."""
    return {"loss_weights": {h: (w if h in heads else 0.0) for h, w in DEFAULT_LOSS_WEIGHTS.items()}}


# Table 5: no adapters is the demo's --no-adapters control (no TED adapters and no temporal adapter: no
# temporal modelling at all); TE / TD keep the temporal adapter, as the paper's rows keep everything but the
# branch. Table 7 keeps both branches and adds the heads in the paper's order.
VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("no_adapters", "no adapters", {"ted_adapters": False, "temporal_adapter": False}),
    Variant("te", "TE only", {"ted_difference": False}),
    Variant("td", "TD only", {"ted_enhance": False}),
    Variant("te_td", "TE+TD, all heads"),
    Variant("contrastive", "contrastive only", heads_only("contrastive")),
    Variant("contrastive_cmc", "contrastive + CMC", heads_only("contrastive", "cmc")),
    Variant("contrastive_cmc_cmlm", "contrastive + CMC + CMLM", heads_only("contrastive", "cmc", "cmlm")),
)}

# (table title, [(row label, variant, the paper's K400 top-1 %)]): the paper's numbers, for comparison only
TABLES: List[Tuple[str, List[Tuple[str, str, Optional[float]]]]] = [
    ("Table 5: TED-Adapter branches", [
        ("no adapters", "no_adapters", None), ("TE only", "te", 83.1), ("TD only", "td", 81.8),
        ("TE + TD", "te_td", 83.4)]),
    ("Table 7: decoder heads (TE + TD adapters)", [
        ("contrastive", "contrastive", 81.4), ("+ CMC", "contrastive_cmc", 82.1),
        ("+ CMC + CMLM", "contrastive_cmc_cmlm", 82.4), ("+ CMC + CMLM + VC", "te_td", 83.4)]),
]


@dataclass(frozen=True)
class Schedule:
    """The synthetic set and the training schedule every variant shares."""

    per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    blr: float
    seeds: Tuple[int, ...]
    data_seed: int = 0

    def data_params(self) -> Dict[str, Any]:
        return {"seed": self.data_seed, "per_class": self.per_class, "val_per_class": self.val_per_class}

    def train_overrides(self) -> List[str]:
        # one evaluation, after the last epoch (train always scores the last one)
        return [f"train.epochs={self.epochs}", f"train.batch_size={self.batch_size}", f"train.blr={self.blr:g}",
                f"train.eval_every={self.epochs}"]


# Sized for 21 runs in under 30 minutes on 2 idle CPU cores: half the demo's batch for twice the optimizer steps
# per clip, at the demo's per-step learning rate (lr = blr * batch / 256 = 5e-3), so that a few epochs leave the
# rows apart from chance and from 100%.
FULL = Schedule(per_class=12, val_per_class=8, epochs=8, batch_size=8, blr=0.16, seeds=(0, 1, 2))
QUICK = Schedule(per_class=2, val_per_class=1, epochs=1, batch_size=8, blr=0.16, seeds=(0,))


def scored_head(variant: Variant) -> str:
    """The head whose top-1 a row reports: ``fused`` (the text and VC heads averaged, as evaluate scores) when
    both are trained; ``text`` without VC, since an untrained VC head would only add noise to the average."""
    return "fused" if "vc" in variant.trained_heads else "text"


def run_argv(variant: Variant, seed: int, schedule: Schedule, data: Path, out: Path) -> List[str]:
    """The train command line of one run (without --resume / --overwrite)."""
    return ["--preset", "demo", "--train-list", str(data / "train.txt"), "--val-list", str(data / "val.txt"),
            "--class-names", str(data / "classes.txt"), "--output-dir", str(out), "--seed", str(seed),
            "--device", "cpu", "--no-progress", "--set", *schedule.train_overrides(), *variant.overrides]


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_result(out: Path, argv: List[str]) -> Optional[Dict[str, Any]]:
    """The result a finished run of exactly ``argv`` left in ``out``, else None."""
    result = _read_json(out / RESULT)
    return result if result is not None and result.get("argv") == argv else None


def _write_spec(out: Path, argv: List[str], seconds: float) -> None:
    (out / SPEC).write_text(json.dumps({"argv": argv, "seconds": seconds}) + "\n")


def train_run(variant: Variant, seed: int, schedule: Schedule, data: Path, out: Path) -> Dict[str, Any]:
    """Train (or continue) one run and write its ``result.json``: the evaluation's top-1 per head and the
    seconds its training took in all (over every attempt that ended in Python; a killed one's are lost)."""
    argv = run_argv(variant, seed, schedule, data, out)
    spec = _read_json(out / SPEC)
    resume = (spec is not None and spec.get("argv") == argv
              and (out / "checkpoints" / "last.pt").is_file())
    seconds = spec["seconds"] if resume else 0.0
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)
    # written first, so that a run killed outright (no finally) is still continued from its checkpoint
    _write_spec(out, argv, seconds)
    start = time.perf_counter()
    try:
        metrics = train_module.train(train_module.parse_args(argv + (["--resume"] if resume else ["--overwrite"])))
    finally:
        seconds += time.perf_counter() - start
        _write_spec(out, argv, seconds)
    result = {"variant": variant.name, "seed": seed, "argv": argv, "seconds": seconds, "resumed": resume,
              **{f"top1_{h}": metrics[f"top1_{h}"] for h in ("text", "vc", "fused")}}
    (out / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_all(schedule: Schedule, data: Path, runs: Path, log=print) -> List[Dict[str, Any]]:
    """Every variant for every seed, reusing finished runs; the results seed by seed, in VARIANTS order, each
    with ``reused``: whether it was read from an earlier invocation's result.json."""
    results = []
    # seed by seed: a run stopped early has every variant for its first seeds, a table that can be read
    jobs = [(v, s) for s in schedule.seeds for v in VARIANTS.values()]
    for i, (variant, seed) in enumerate(jobs, start=1):
        out = runs / f"{variant.name}_seed{seed}"
        result = finished_result(out, run_argv(variant, seed, schedule, data, out))
        reused = result is not None
        if not reused:
            log(f"[{i}/{len(jobs)}] training {variant.label}, seed {seed} in {out}")
            result = train_run(variant, seed, schedule, data, out)
            how = f"in {result['seconds'] / 60:.1f} min"
        else:
            how = "reused (finished earlier)"
        log(f"[{i}/{len(jobs)}] {variant.label}, seed {seed}: top-1 {result[f'top1_{scored_head(variant)}']:.1f}% "
            f"({scored_head(variant)} head) {how}")
        results.append({**result, "reused": reused})
    return results


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="m2clip_ablate",
                   help="holds the synthetic set (data/) and one folder per run (runs/); finished runs are reused")
    p.add_argument("--report-dir", default="docs", help="where ablation.md and ablation.png are written")
    p.add_argument("--quick", action="store_true",
                   help=f"one seed, {QUICK.per_class} videos per class, {QUICK.epochs} epoch: a smoke test of the "
                        f"command, not an ablation")
    p.add_argument("--seeds", type=int_at_least(0), nargs="+", default=None,
                   help=f"training seeds (default {' '.join(map(str, FULL.seeds))}); the synthetic set is the same")
    args = p.parse_args(argv)
    return run_main(lambda: _run(args), PROG,
                    on_interrupt=lambda: "finished runs are kept, and the one stopped continues from its last "
                                         "checkpoint: run the same command again")


def check_report_dir(report: Path) -> None:
    """Fail before any training, not after it, when the report can't be written."""
    try:
        report.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--report-dir {report}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(report, os.W_OK):
        raise UsageError(f"--report-dir {report}: not writable")


def table_rows(results: Sequence[Dict[str, Any]]) -> List[ablation_report.Table]:
    """TABLES with each row's results (the runs of its variant, by seed) filled in."""
    by_variant: Dict[str, List[Dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        by_variant.setdefault(r["variant"], []).append(r)
    return [(title, [ablation_report.Row(label, " ".join(VARIANTS[name].overrides), scored_head(VARIANTS[name]),
                                         "vc" in VARIANTS[name].trained_heads, by_variant[name], paper)
                     for label, name, paper in rows])
            for title, rows in TABLES]


def settings_lines(schedule: Schedule) -> List[str]:
    """The report's description of what every run shared."""
    n_val = schedule.val_per_class * len(CLASSES)
    return [
        f"the `demo` preset (`m2clip-demo` backbone with random frozen weights, 3 TED layers before attention and "
        f"before the MLP, bottleneck 256, 8 frames every 4th of 32), changed only as each row says and by "
        f"{', '.join(f'`{o}`' for o in schedule.train_overrides())} (a shorter schedule than the demo's, so that "
        f"the rows do not all reach 100%)",
        f"one synthetic set (seed {schedule.data_seed}): {len(CLASSES)} motion classes, {schedule.per_class} "
        f"training and {schedule.val_per_class} held-out H.264 videos per class; top-1 over the {n_val} held-out "
        f"videos, chance {100 / len(CLASSES):.1f}%",
        f"training seeds {', '.join(map(str, schedule.seeds))}: each draws the frozen backbone, the adapters' "
        f"initialisation and the data order; mean ± sample standard deviation (n − 1) over them",
        "scored head: `fused` (text and VC probabilities averaged, as `evaluate` reports) where the VC head is "
        "trained, else `text` (cosine to the class prompts); the paper's Table 7 rows without VC have no VC head",
        "TE only / TD only keep the temporal adapter on the frame embeddings; `no adapters` has neither TED nor "
        "temporal adapter (the demo's `--no-adapters`). TE + TD with all heads is Table 5's last row and Table "
        "7's: one set of runs",
        "paper: ViT-B/16 on Kinetics-400 (its Tables 5 and 7), for the ordering only: another dataset and scale",
    ]


def _run(args: argparse.Namespace) -> int:
    schedule = QUICK if args.quick else FULL
    if args.seeds:
        schedule = replace(schedule, seeds=tuple(dict.fromkeys(args.seeds)))
    out, report = Path(args.output_dir), Path(args.report_dir)
    check_report_dir(report)
    start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    data = out / "data"
    print(prepare_data(data, **schedule.data_params()))
    results = run_all(schedule, data, out / "runs")
    timing = {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu_start,
              "train_s": sum(r["seconds"] for r in results), "load": (load_start, os.getloadavg()),
              "reused": sum(r["reused"] for r in results), "runs": len(results)}
    command = " ".join([PROG] + argv_for_report(args))
    md, png = ablation_report.write_report(table_rows(results), settings_lines(schedule), timing, command, report)
    print(f"wrote {md} and {png} ({timing['wall_s'] / 60:.1f} min)")
    return 0


def argv_for_report(args: argparse.Namespace) -> List[str]:
    """The options the report quotes as its command (only those given)."""
    items = ["--quick"] if args.quick else []
    if args.seeds:
        items += ["--seeds", *map(str, args.seeds)]
    return items


if __name__ == "__main__":
    sys.exit(main())
