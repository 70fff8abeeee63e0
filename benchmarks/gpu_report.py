"""The README's GPU rows in one command: adapter, training step and loader, as a markdown table and JSON.

    python benchmarks/gpu_report.py --out DIR              # on one H100/H200: at most 8 minutes
    python benchmarks/gpu_report.py --dry-run --out DIR    # CPU, tiny shapes: every code path, no GPU numbers

Sections (each row checked for correctness before it is timed):
  adapter    TED adapter forward and forward+backward in bf16 at the paper's shape (2 clips × 8 frames × 197
             tokens × 768 channels, r = 384): eager reference, official-style eager, torch.compile(reference),
             the fused Triton kernels (CUDA only), and the bytes floor of the fused design from roofline.py (a
             model of an H100 SXM, not a measurement). Results against float64 within 2× PyTorch's own eager
             bf16 error (test_adapter.assert_bf16_close); minimum ms over the rounds.
  train      one k400_b16_8f training step (forward, backward, AdamW) at a GPU batch (16): the official-style
             baseline (fp32) against ours in fp32 and in bf16, each in a fresh process (test_train_step's
             workers), clips/s from the median steady step, peak step memory (max_memory_allocated minus
             memory_allocated before the step); first-step losses checked against the baseline's.
  loader     training clips/s of the PyAV loader (DataLoader workers) and the DALI loader (GPU decoding, and
             DALI's CPU decoder where it reads the files' codec) over copies of one generated video, batches
             moved to the device.

A row that cannot run here says why ("skipped: no CUDA", "skipped: NVIDIA DALI not installed", "skipped: over the
time budget"); a row that fails says "error: ..." and makes the exit status 1. --dry-run (= --device cpu --quick)
runs every section on the CPU with tiny shapes, so that every code path executes without a GPU; its numbers
describe nothing but the dry run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's package when it is not installed

import roofline  # noqa: E402
import test_adapter as adapter_bench  # noqa: E402
import test_train_step as step_bench  # noqa: E402
from baselines import OfficialStyleTEDAdapter  # noqa: E402

from m2clip_fast.adapters import TEDAdapter  # noqa: E402
from m2clip_fast.fused import FusedTEDAdapter  # noqa: E402
from m2clip_fast.selftest import environment  # noqa: E402

NO_CUDA = "skipped: no CUDA"
QUICK_CLASSES = ("moving left", "moving right", "rotating clockwise", "growing")  # --quick's few text prompts


@dataclass
class Settings:
    """The shapes and repetitions of one report: full size on CUDA, tiny for --quick."""

    device: torch.device
    quick: bool
    adapter_shape: Tuple[int, int, Tuple[int, int], int, int]  # clips, frames, (h, w) patches, channels, r
    adapter_rounds: Dict[str, int]
    preset: str
    class_names: Optional[Sequence[str]]  # None: the preset's (400 for Kinetics-400)
    batch: int
    train_rounds: int
    loader: Dict[str, Any]  # codec, extension, frames, height, width, videos, batch, num_frames, size, stride, workers

    @classmethod
    def make(cls, device: torch.device, quick: bool) -> "Settings":
        if quick:
            return cls(device, True, (1, 4, (2, 2), 16, 8), {"fwd": 3, "fwd+bwd": 3}, "tiny", QUICK_CLASSES, 2, 1,
                       dict(codec="vp9", extension=".webm", frames=24, height=48, width=64, videos=4, batch=2,
                            num_frames=4, size=32, stride=2, workers=0))
        a = adapter_bench
        return cls(device, False, (a.BATCH, a.FRAMES, a.GRID, a.DIM, a.R), {"fwd": 50, "fwd+bwd": 30},
                   step_bench.PRESET, None, step_bench.BATCH["cuda"], 3,
                   dict(codec="h264", extension=".mp4", frames=96, height=240, width=320, videos=32, batch=8,
                        num_frames=8, size=224, stride=8, workers=min(8, os.cpu_count() or 1)))

    def describe(self) -> Dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "device"}
        return {"device": str(self.device), **out}


@dataclass
class Row:
    section: str
    name: str
    status: str  # "measured", "model", "skipped: why" or "error: what"
    values: Dict[str, Any] = field(default_factory=dict)


class Report:
    """The rows so far, and the time budget: a row started after the deadline is skipped, not run."""

    def __init__(self, budget_s: float):
        self.rows: List[Row] = []
        self.deadline = time.monotonic() + budget_s

    def run(self, section: str, name: str, measure: Callable[[], Tuple[str, Dict[str, Any]]]) -> Row:
        """``measure()`` returns (status, values); an exception becomes an "error: ..." row."""
        if time.monotonic() > self.deadline:
            row = Row(section, name, "skipped: over the time budget (--budget-s)")
        else:
            try:
                status, values = measure()
                row = Row(section, name, status, values)
            except Exception as exc:  # one row fails, the report goes on
                traceback.print_exc()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                row = Row(section, name, f"error: {type(exc).__name__}: {first}"[:300])
        print(f"[{section}] {name}: {row.status} {row.values}", flush=True)
        self.rows.append(row)
        return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def min_ms(step: Callable[[], Any], rounds: int, warmup: int = 2) -> float:
    """The fastest of ``rounds`` calls of ``step`` (which waits for the device itself), in ms."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


# ------------------------------------------------------------------------------------------------ adapter


def adapter_section(report: Report, s: Settings) -> None:
    b, t, grid, dim, r = s.adapter_shape
    torch.manual_seed(0)
    ref = adapter_bench.randomised(TEDAdapter(dim, r, t))
    gen = torch.Generator().manual_seed(1)
    shape = (b * t, 1 + grid[0] * grid[1], dim)
    x, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    fp64 = adapter_bench.ModuleRunner(copy.deepcopy(ref).double(), x.double(), grad.double()).results()
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    dev = s.device
    waits = (lambda: sync(dev)) if dev.type == "cuda" else None

    def runner(module):  # bf16 tokens on the device
        return adapter_bench.ModuleRunner(module.to(dev), x.to(dev, torch.bfloat16), grad.to(dev, torch.bfloat16),
                                          sync=waits)

    eager = runner(copy.deepcopy(ref).bfloat16())
    eager_bf16 = eager.results()
    timings: Dict[str, float] = {}

    def timed(name: str, make: Callable[[], Any]):
        def measure():
            run = make()
            got = [g.reshape(w.shape) for g, w in zip(run.results(), fp64)]  # official Conv3d weight: (r,1,1,3,3)
            adapter_bench.assert_bf16_close(name, names, got, eager_bf16, fp64)
            values = {"ms_fwd": min_ms(run.forward, s.adapter_rounds["fwd"]),
                      "ms_fwd_bwd": min_ms(run.forward_backward, s.adapter_rounds["fwd+bwd"]),
                      "accuracy": "within 2x eager bf16 error of float64"}
            timings[name] = values["ms_fwd_bwd"]
            return "measured", values
        return measure

    def fused_triton():
        if dev.type != "cuda":
            return NO_CUDA, {}
        module = FusedTEDAdapter(dim, r, t, backend="triton")
        module.load_state_dict(ref.state_dict())
        return timed("fused Triton", lambda: runner(module))()

    report.run("adapter", "eager reference", timed("eager reference", lambda: eager))
    report.run("adapter", "official-style eager",
               timed("official-style eager", lambda: runner(OfficialStyleTEDAdapter.from_ted(ref).bfloat16())))
    report.run("adapter", "torch.compile(reference)",
               timed("torch.compile(reference)", lambda: runner(torch.compile(copy.deepcopy(ref).bfloat16()))))
    report.run("adapter", "fused Triton", fused_triton)
    floor = report.run("adapter", "bytes floor (roofline model)", lambda: _floor(s)).values
    official = timings.get("official-style eager")
    for row in report.rows:
        if row.section != "adapter" or row.status != "measured":
            continue
        if official:
            row.values["x_vs_official"] = official / row.values["ms_fwd_bwd"]
        if floor.get("shape") == "paper shape":  # the model describes this run's shape
            row.values["x_vs_floor"] = row.values["ms_fwd_bwd"] / floor["ms_fwd_bwd"]


def _floor(s: Settings) -> Tuple[str, Dict[str, Any]]:
    """roofline.py's floor of the fused design at the paper's shape (an H100 SXM model, bf16)."""
    fwd, bwd = roofline.fused()
    both = roofline.Trace(fwd.kernels + bwd.kernels)
    paper = (roofline.B, roofline.T, (roofline.H, roofline.W), roofline.C, roofline.R)
    return "model", {"ms_fwd": roofline.floor_us(fwd.bytes, fwd.flops)[2] / 1e3,
                     "ms_fwd_bwd": roofline.floor_us(both.bytes, both.flops)[2] / 1e3, "mb_moved": both.bytes / 1e6,
                     "shape": "paper shape" if s.adapter_shape == paper else "paper shape, not this run's"}


# -------------------------------------------------------------------------------------------- training step

TRAIN_VARIANTS = {"official-style fp32": dict(official=True, amp=None), "ours fp32": dict(official=False, amp=None),
                  "ours bf16": dict(official=False, amp="bf16")}


def train_section(report: Report, s: Settings) -> None:
    first: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="m2clip_gpu_report_") as grads:
        for name, spec in TRAIN_VARIANTS.items():
            report.run("train", name, lambda name=name, spec=spec: _train_variant(s, name, spec, grads, first))
    base = next((r.values for r in report.rows if r.section == "train" and r.name == "official-style fp32"
                 and r.status == "measured"), None)
    for row in report.rows:
        if row.section == "train" and row.status == "measured" and base:
            row.values["x_clips_per_s"] = row.values["clips_per_s"] / base["clips_per_s"]
            row.values["x_memory"] = row.values["peak_step_mb"] / base["peak_step_mb"]


def _train_variant(s: Settings, name: str, spec: dict, grads: str, first: Dict[str, Dict[str, float]]):
    worker = step_bench.WorkerProcess(name, grads, spec={**spec, "device": s.device.type, "preset": s.preset,
                                                            "class_names": s.class_names, "batch": s.batch})
    try:
        first[name] = worker.first["losses"]
        steady = [worker.step() for _ in range(s.train_rounds)]
    finally:
        worker.close()
    seconds = statistics.median(x["seconds"] for x in steady)
    values = {"batch": worker.info["batch"], "s_per_step": seconds, "clips_per_s": worker.info["batch"] / seconds,
              "peak_step_mb": max(x["peak_step_bytes"] for x in steady) / 2**20,
              "first_step_s": worker.first["seconds"], "loss": first[name]["loss"]}
    against, tol = ("ours fp32", step_bench.BF16_LOSS_TOL) if spec["amp"] else ("official-style fp32",
                                                                               step_bench.FP32_LOSS_TOL)
    if against in first and against != name:
        err = max(step_bench._relative(v, first[against][k]) for k, v in first[name].items())
        values[f"loss_vs_{against}"] = err
        if err > tol:
            return f"error: first-step losses differ from {against} by {err:.2e} relative (allowed {tol:g})", values
    return "measured", values


# --------------------------------------------------------------------------------------------------- loader


def loader_section(report: Report, s: Settings) -> None:
    from m2clip_fast.data.dali import dali_available
    from m2clip_fast.data.synthetic import textured_frames, write_video

    c = s.loader
    with tempfile.TemporaryDirectory(prefix="m2clip_gpu_report_videos_") as tmp:
        one = write_video(Path(tmp) / f"v0{c['extension']}", textured_frames(c["frames"], c["height"], c["width"],
                                                                              seed=0),
                          codec=c["codec"], gop=12, threads=0)
        samples = [(str(one), 0)]
        for i in range(1, c["videos"]):  # copies: the decoders keep nothing across files
            samples.append((str(shutil.copyfile(one, Path(tmp) / f"v{i}{c['extension']}")), i % 4))

        def dali(device: str):
            if device == "cuda" and s.device.type != "cuda":
                return NO_CUDA, {}
            if not dali_available():
                return "skipped: NVIDIA DALI not installed", {}
            if device == "cpu" and c["codec"] not in ("vp8", "vp9", "mjpeg"):
                return f"skipped: DALI's CPU decoder reads VP8/VP9/MJPEG, not {c['codec']}", {}
            return "measured", _loader_rate(s, samples, "dali", torch.device(device))

        report.run("loader", "PyAV", lambda: ("measured", _loader_rate(s, samples, "pyav", s.device)))
        report.run("loader", "DALI (GPU)", lambda: dali("cuda"))
        report.run("loader", "DALI (CPU)", lambda: dali("cpu"))


def _loader_rate(s: Settings, samples, decoder: str, device: torch.device) -> Dict[str, Any]:
    """Clips/s over two epochs of training batches, the first batch (pipeline or worker start-up) untimed."""
    from m2clip_fast.data.loader import build_clip_loader

    c = s.loader
    loader = build_clip_loader(samples, train=True, decoder=decoder, device=device, batch_size=c["batch"],
                               workers=c["workers"], num_frames=c["num_frames"], size=c["size"], sampling="dense",
                               stride=c["stride"], seed=0)
    clips, start, batches = 0, None, 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            video = batch["video"].to(s.device, non_blocking=True)
            assert video.shape[1:] == (c["num_frames"], 3, c["size"], c["size"]), video.shape
            sync(s.device)
            if start is None:
                start = time.perf_counter()
                continue
            clips += video.shape[0]
            batches += 1
    if not batches:
        raise RuntimeError(f"{len(samples)} videos made only one batch: nothing to time")
    seconds = time.perf_counter() - start
    return {"clips_per_s": clips / seconds, "timed_batches": batches, "codec": c["codec"],
            "workers": c["workers"]}


# --------------------------------------------------------------------------------------------------- output

COLUMNS = {
    "adapter": [("ms fwd", "ms_fwd", ".3f"), ("ms fwd+bwd", "ms_fwd_bwd", ".3f"),
                ("× vs official-style", "x_vs_official", ".2f"), ("÷ floor", "x_vs_floor", ".2f")],
    "train": [("batch", "batch", "d"), ("s/step", "s_per_step", ".3f"), ("clips/s", "clips_per_s", ".2f"),
              ("peak step MB", "peak_step_mb", ".0f"), ("× clips/s", "x_clips_per_s", ".2f"),
              ("× memory", "x_memory", ".2f")],
    "loader": [("clips/s", "clips_per_s", ".2f"), ("timed batches", "timed_batches", "d"), ("codec", "codec", "s")],
}
TITLES = {"adapter": "TED adapter, bf16", "train": "Training step", "loader": "Loader"}


def markdown(rows: List[Row], env: List[Tuple[str, str]], s: Settings, seconds: float) -> str:
    lines = ["# GPU report", "", "DRY RUN on the CPU with tiny shapes: these numbers describe no GPU."
             if s.quick else f"Device {s.device}, full-size shapes.", "", "| environment | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env]
    lines += ["", f"Wall time {seconds:.0f} s. Settings: `{json.dumps(s.describe())}`"]
    for section, columns in COLUMNS.items():
        lines += ["", f"## {TITLES[section]}", "",
                  "| row | " + " | ".join(c[0] for c in columns) + " | status |",
                  "|---" * (len(columns) + 2) + "|"]
        for row in (r for r in rows if r.section == section):
            cells = [format(row.values[key], fmt) if key in row.values else "" for _, key, fmt in columns]
            lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {row.status} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_report.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_report.md and gpu_report.json")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that every row runs, measures nothing")
    p.add_argument("--dry-run", action="store_true", help="--device cpu --quick")
    p.add_argument("--budget-s", type=float, default=480, help="rows not started by then are skipped (default 480)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available (use --dry-run to check the command on the CPU)")
    if args.device == "cpu" and not args.quick:
        p.error("the full-size report is for a GPU (a baseline step at batch 16 takes minutes on a CPU): add "
                "--quick, or use --dry-run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings.make(torch.device(args.device), args.quick)
    report, start = Report(args.budget_s), time.monotonic()
    for section in (adapter_section, train_section, loader_section):
        section(report, settings)
    seconds = time.monotonic() - start
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(
        {"environment": dict(env), "settings": settings.describe(), "dry_run": settings.quick, "seconds": seconds,
         "rows": [asdict(r) for r in report.rows]}, indent=2, default=str))
    (out / "gpu_report.md").write_text(markdown(report.rows, env, settings, seconds))
    print(f"wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'} ({seconds:.0f} s)")
    return 1 if any(r.status.startswith("error") for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
