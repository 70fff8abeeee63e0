"""One M²-CLIP training step end to end: k400_b16_8f (ViT-B/16, 8 frames, 400 classes), random init.

    python -m pytest benchmarks/test_train_step.py -s      # about 6 minutes on 2 busy CPU cores

A step is forward + backward + AdamW (the training loop's parameter groups), on a fixed random batch
(2 clips on CPU, 16 on CUDA). Variants:
  official-style fp32   benchmarks/baselines.py: official-style TED adapters, nn.MultiheadAttention, the
                        full text encoder over all 400 prompts × 77 tokens every step, no caches
  ours fp32             fused=True (C++ TED path), sdpa attention, text cache + end-of-text path
  ours bf16 autocast    the same under torch.autocast("cpu", bfloat16), if the CPU has native bf16
  ... (cuda)            the same three on CUDA (bf16 as the training loop runs it there: bf16 frozen
                        weights + autocast), skipped without a GPU

Every variant runs in its own fresh worker process (this file run as a script), so that its peak
memory is its own: RSS on CPU (peak RSS during the step, read from VmHWM after resetting it through
/proc/self/clear_refs, minus the RSS just before the step, after malloc_trim has returned freed heap
memory), torch.cuda.max_memory_allocated minus memory_allocated on CUDA. The parent process drives
the worker over a pipe; pytest-benchmark times each steady-state step round trip (the pipe adds well
under a millisecond to steps of seconds). The worker's first step (text cache fill, optimizer state
allocation, first-touch of every buffer) is its warm-up and is reported separately.

Correctness (asserted): the workers build the model from the same seed, so the frozen weights are
identical (checked by a fingerprint) and the tunable parameters get the same random values; the
baseline copies them into its official-style adapters. The first step's per-head losses and all
parameter gradients of the baseline and of ours must agree to fp32 reassociation error (see
FP32_LOSS_TOL / FP32_GRAD_TOL), and the bf16 loss must be close to the fp32 one (BF16_LOSS_TOL).

Against the machine's own limit: after its timed rounds each worker counts one more step's FLOPs
(torch.utils.flop_counter over forward and backward; matrix products, convolutions and attention) and times
torch.mm on the step's dominant GEMM shape (the vision MLP's (B·T·197)×768→3072 for ViT-B/16) in the step's
compute dtype (benchmarks/limits.py); the table's "of GEMM peak" is step FLOPs / step time / that GEMM's
FLOP/s. Target for ours fp32 on the CPU: >= 0.7; benchmarks/profile_step.py shows where the rest goes.

The summary table (medians of the rounds; peak memory = the largest over the steady rounds) is
printed at the end. It also lists each step's process CPU time (all threads, user + system): on a
shared machine other processes stretch wall time far more than the CPU time a step consumes, so
the CPU-time ratio is the steadier estimate of the speed-up (OpenMP spin-waits still inflate it
somewhat under contention). Timed rounds: 2 for ours, 1 for the baseline (a baseline CPU step takes over a
minute on 2 loaded cores; its warm-up step is a second sample, shown as "first s");
M2CLIP_TRAIN_ROUNDS=n sets every variant's rounds; M2CLIP_BENCH_THREADS=n sets torch's intra-op
threads in the workers.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from limits import cell  # noqa: E402

PRESET = "k400_b16_8f"  # 8 frames of 224 px
BATCH = {"cpu": 2, "cuda": 16}
BASELINE = "official-style fp32"
# Timed steady-state rounds per variant. The baseline has no cache to fill, so its warm-up step already does
# a steady step's work (it is reported next to it); one more round keeps the file near 6 minutes on 2 cores.
ROUNDS = {v: 1 if v.startswith(BASELINE) else 2 for v in (BASELINE, BASELINE + " (cuda)")}

VARIANTS = {
    BASELINE: dict(official=True, amp=None, device="cpu"),
    "ours fp32": dict(official=False, amp=None, device="cpu"),
    "ours bf16 autocast": dict(official=False, amp="bf16", device="cpu"),
    "official-style fp32 (cuda)": dict(official=True, amp=None, device="cuda"),
    "ours fp32 (cuda)": dict(official=False, amp=None, device="cuda"),
    "ours bf16 (cuda)": dict(official=False, amp="bf16", device="cuda"),
}
# Both fp32 paths compute the same function but sum in different orders (fused vs separate adapter GEMMs,
# 77 vs trimmed text columns, the last text block on EOT rows only, sdpa vs nn.MultiheadAttention): each op
# is exact to a few fp32 ulps (~1e-7 relative), and ~40 layers deep the losses agree to ~1e-6 relative or
# better (measured on the 2-core Xeon: equal to the last bit, gradients within 4e-6). 1e-4 leaves room for
# other BLAS builds and thread counts. Gradients are compared per trained tensor against its largest
# magnitude (one more pass of reassociated sums: 1e-3), so a changed branch, mask or pooling row, which
# changes some tensor's gradient by O(1) of its scale, fails the check even where the loss barely moves.
FP32_LOSS_TOL, FP32_GRAD_TOL = 1e-4, 1e-3
# bf16 keeps 8 significant bits (relative rounding ≤ 2^-9 ≈ 2e-3 per op) and the rounding errors of
# ~40 layers add up in the loss to about 1e-2 relative at most: 5e-2 only catches real breakage.
BF16_LOSS_TOL = 5e-2
RESULTS: Dict[str, Dict[str, float]] = {}


def rounds(variant: str) -> int:
    if os.environ.get("M2CLIP_TRAIN_ROUNDS"):  # every variant's, as the module docstring says
        return int(os.environ["M2CLIP_TRAIN_ROUNDS"])
    return ROUNDS.get(variant, 2)


# ---------------------------------------------------------------------------------------------- worker
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class HostMemory:
    """Peak RSS of a region of code, minus the RSS before it (Linux)."""

    def __init__(self):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc: freed heap memory may stay resident, the delta then reads low
            self._trim = None

    def start(self) -> int:
        if self._trim is not None:
            self._trim(0)  # freed heap memory back to the OS, so "before" is what is live
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _rss_kb("VmRSS") * 1024

    @staticmethod
    def peak() -> int:
        return _rss_kb("VmHWM") * 1024


def tunable_gradients(model) -> Dict[str, torch.Tensor]:
    """{parameter name in our naming: gradient}; official-style adapters' gradients are renamed back."""
    from baselines import OfficialStyleTEDAdapter
    from m2clip_fast.convert import convert_official_adapter

    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    for name, adapter in model.ted_adapters.items():
        if isinstance(adapter, OfficialStyleTEDAdapter):
            prefix = f"ted_adapters.{name}."
            theirs = {k[len(prefix):]: grads.pop(k) for k in list(grads) if k.startswith(prefix)}
            grads.update({prefix + k: v for k, v in convert_official_adapter(theirs).items()})
    return grads


class Worker:
    """The worker process's state: model, optimizer, batch; ``step`` runs and measures one training step."""

    def __init__(self, spec: dict):
        from baselines import make_official_style, randomise_tunable
        from m2clip_fast import create_model
        from m2clip_fast.train import param_groups

        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        self.host = HostMemory()
        if self.cuda:  # cuDNN would run the baseline's fp32 convs in TF32 and fail the fp32 comparison
            torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        model = create_model(spec.get("preset", PRESET), pretrained=None, class_names=spec.get("class_names"),
                             fused=True, attention="sdpa")
        self.fingerprint = sum(p.double().sum().item() for p in model.clip.parameters())
        randomise_tunable(model)
        if spec["official"]:
            model = make_official_style(model)  # copies the randomised adapters into official form
        model.to(self.device).train()
        self.amp = torch.bfloat16 if spec["amp"] == "bf16" else None
        if self.cuda and self.amp is not None:
            model.set_backbone_dtype(self.amp)  # the training loop's CUDA bf16: bf16 frozen weights + autocast
        self.model = model
        train = model.config.train
        batch = spec.get("batch", BATCH[self.device.type])
        lr = train["blr"] * batch / 256
        groups = param_groups(model, lr, train["weight_decay"], train["text_lr_scale"], train["no_decay"])
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
        gen = torch.Generator().manual_seed(1)
        size = model.crop_size
        self.video = torch.randn(batch, model.num_frames, 3, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, model.num_classes, (batch,), generator=gen).to(self.device)
        self.steps = 0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        """The step's autocast context (none in fp32)."""
        from m2clip_fast.runtime import autocast

        return autocast(self.device, self.amp)

    def step(self, save_grads: Optional[str] = None) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        # Dropout (VC head) and CMLM's word masks draw from the global RNG: the same draws in every variant.
        torch.manual_seed(100 + self.steps)
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            before = self.host.start()
        context = self.autocast()
        t0, cpu0 = time.perf_counter(), time.process_time()
        with context:
            losses = self.model(self.video, self.labels)
        losses["loss"].backward()
        self.optimizer.step()
        self._sync()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else self.host.peak()
        self.steps += 1
        if save_grads:
            torch.save(tunable_gradients(self.model), save_grads)
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_step_bytes": peak - before,
                "peak_bytes": peak, "before_bytes": before,
                "losses": {k: float(v.detach()) for k, v in losses.items()}}

    def dominant_gemm(self) -> tuple:
        """(rows, in, out) of the step's largest GEMM class: the vision MLP's first linear over every token of
        every frame, (B·T·(1 + h·w), width) × (width, 4·width); for ViT-B/16, 8 frames, batch 2: 3152×768→3072."""
        visual = self.model.clip.visual
        fc = visual.transformer.resblocks[0].mlp.c_fc
        h, w = self.model.grid
        return self.video.shape[0] * self.video.shape[1] * (1 + h * w), fc.in_features, fc.out_features

    def limits(self) -> dict:
        """The step's FLOPs (flop counter over the forward and backward of one more step, not timed, no optimizer
        update: AdamW's elementwise work counts zero anyway) and torch.mm's FLOP/s on the dominant GEMM shape in
        the step's compute dtype, timed here: same process, same threads."""
        from limits import count_flops, gemm_flops_per_s

        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(100 + self.steps)
        context = self.autocast()

        def run():
            with context:
                losses = self.model(self.video, self.labels)
            losses["loss"].backward()

        flops = count_flops(run)
        self.optimizer.zero_grad(set_to_none=True)
        shape = self.dominant_gemm()
        gemm = gemm_flops_per_s(*shape, dtype=self.amp or torch.float32, device=self.device.type)
        return {"flops": flops.total, "gemm_share": flops.gemm_share, "gemm_shape": shape, "gemm_flops_s": gemm}


def worker_main(spec_json: str) -> None:
    """Protocol: one JSON object per line on the original stdout (everything else printed goes to stderr);
    commands, one JSON object per line on stdin: {"op": "step", "grads": path or null}, {"op": "limits"} (see
    Worker.limits) or {"op": "exit"}."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(spec_json)
    if os.environ.get("M2CLIP_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["M2CLIP_BENCH_THREADS"]))
    worker = Worker(spec)
    proto.write(json.dumps({"ready": True, "fingerprint": worker.fingerprint, "threads": torch.get_num_threads(),
                            "batch": worker.video.shape[0]}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        result = worker.limits() if command["op"] == "limits" else worker.step(command.get("grads"))
        proto.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------- parent
class WorkerProcess:
    """A fresh Python process holding one variant's model; ``step()`` runs one training step in it."""

    def __init__(self, variant: str, grads_dir: str, spec: Optional[dict] = None):
        """``spec``: VARIANTS[variant] by default; may also name a "preset", "class_names" and a "batch"
        (gpu_report.py)."""
        # the worker runs in benchmarks/: the repository root on its path imports this checkout's package
        path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        spec = VARIANTS[variant] if spec is None else spec
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(HERE))
        self.info = self._read()
        self.grads_path = os.path.join(grads_dir, variant.replace(" ", "_") + ".pt")
        self.first = self.step(save_grads=True)  # the warm-up step, measured on its own

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"benchmark worker exited with status {code} (its stderr is above)")
        return json.loads(line)

    def step(self, save_grads: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"op": "step", "grads": self.grads_path if save_grads else None}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def limits(self) -> dict:
        self.proc.stdin.write(json.dumps({"op": "limits"}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def grads(self) -> Dict[str, torch.Tensor]:
        return torch.load(self.grads_path)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Workers:
    """One worker per variant, started on first use (its first step runs then) and kept until closed."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="m2clip_train_step_")
        self._workers: Dict[str, WorkerProcess] = {}
        self.first: Dict[str, dict] = {}  # each variant's first (warm-up) step, kept after its worker is closed

    def first_step(self, variant: str) -> dict:
        """The variant's first-step results, starting its worker if it never ran."""
        if variant not in self.first:
            self.get(variant)
        return self.first[variant]

    def get(self, variant: str) -> WorkerProcess:
        spec = VARIANTS[variant]
        if spec["device"] == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if spec["device"] == "cpu" and spec["amp"] == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pytest.skip("this CPU has no native bf16 (oneDNN reports no bf16 support)")
        if variant not in self._workers:
            self._workers[variant] = WorkerProcess(variant, self._dir.name)
            self.first[variant] = self._workers[variant].first
        return self._workers[variant]

    def close(self, variant: Optional[str] = None) -> None:
        for name in [variant] if variant else list(self._workers):
            worker = self._workers.pop(name, None)
            if worker is not None:
                worker.close()

    def cleanup(self) -> None:
        self.close()
        self._dir.cleanup()


@pytest.fixture(scope="module")
def workers(request):
    pool = Workers()
    yield pool
    pool.cleanup()
    table = summary_table()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + table, flush=True)  # teardown output is captured otherwise


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_same_loss_and_gradients(workers, device):
    """The baseline and ours, same weights, same batch, same random draws: same losses and gradients."""
    suffix = "" if device == "cpu" else " (cuda)"
    base, ours = workers.get(BASELINE + suffix), workers.get("ours fp32" + suffix)
    assert base.info["fingerprint"] == ours.info["fingerprint"], "the workers built different frozen weights"
    worst = {}
    for head, want in base.first["losses"].items():
        worst[head] = _relative(ours.first["losses"][head], want)
        assert worst[head] <= FP32_LOSS_TOL, f"{head} loss: ours {ours.first['losses'][head]} vs baseline {want}"
    got, want = ours.grads(), base.grads()
    assert set(got) <= set(want), "the two models train different parameters"
    grad_err = 0.0
    for name in want:
        # ours leaves out what gets no gradient (the last block's D branch): the baseline's must be exactly 0
        mine = got.get(name, torch.zeros_like(want[name]))
        scale = want[name].abs().max().item()
        err = (mine - want[name]).abs().max().item() / max(scale, 1e-30)
        grad_err = max(grad_err, err)
        assert err <= FP32_GRAD_TOL, f"gradient of {name}: error {err:.3g} of its largest magnitude"
    RESULTS.setdefault("_check" + suffix, {}).update(loss_rel_err=max(worst.values()), grad_rel_err=grad_err)
    print(f"\nsame function{suffix}: losses {base.first['losses']} vs {ours.first['losses']}; max relative loss "
          f"difference {max(worst.values()):.2e}, max gradient error {grad_err:.2e} of the parameter's largest")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, workers, variant):
    worker = workers.get(variant)
    first = worker.first
    if "bf16" in variant:  # against the same device's fp32 first step: same weights, batch and draws
        fp32 = workers.first_step("ours fp32" + (" (cuda)" if "cuda" in variant else ""))["losses"]["loss"]
        err = _relative(first["losses"]["loss"], fp32)
        assert err <= BF16_LOSS_TOL, f"bf16 loss {first['losses']['loss']} vs fp32 {fp32}"
        RESULTS.setdefault(variant, {})["loss_vs_fp32"] = err
    steady = []
    benchmark.pedantic(lambda: steady.append(worker.step()), rounds=rounds(variant), warmup_rounds=0, iterations=1)
    limits = worker.limits()
    workers.close(variant)  # frees its memory before the next variant
    batch = worker.info["batch"]
    record = RESULTS.setdefault(variant, {})
    record.update(batch=batch, rounds=rounds(variant), threads=worker.info["threads"], first_s=first["seconds"],
                  first_peak_mb=first["peak_step_bytes"] / 2**20,
                  peak_mb=max(s["peak_step_bytes"] for s in steady) / 2**20,
                  peak_total_mb=max(s["peak_bytes"] for s in steady) / 2**20,
                  worker_s=statistics.median(s["seconds"] for s in steady),
                  cpu_s=statistics.median(s["cpu_seconds"] for s in steady), loss=first["losses"]["loss"])
    record.update(limits, achieved_flops_s=limits["flops"] / record["worker_s"])
    record["of_gemm_peak"] = record["achieved_flops_s"] / limits["gemm_flops_s"]
    if benchmark.stats is not None:  # None under --benchmark-disable
        record["s"] = benchmark.stats.stats.median
    benchmark.extra_info.update({k: v for k, v in record.items()}, variant=variant,
                                memory="host RSS" if "cuda" not in variant else "cuda allocated",
                                accuracy="losses/gradients checked vs the official-style baseline")


def _ratios(r: dict, base: dict):
    """(clips/s, peak step memory, clips per CPU-second) of r relative to base; None where either is missing."""
    if not r.get("s") or not base.get("s"):
        return None, None, None
    return (r["batch"] / r["s"]) / (base["batch"] / base["s"]), r["peak_mb"] / base["peak_mb"], \
        (r["batch"] / r["cpu_s"]) / (base["batch"] / base["cpu_s"])


def _limits_notes(rows) -> list:
    """How the FLOP columns were made, with each variant's dominant GEMM shape and the GEMMs' share of FLOPs."""
    lines = ["  GFLOP/step: flop counter over one step's forward + backward (matrix products, convolutions, attention; "
             "elementwise work counts 0); GFLOP/s: that / the worker's median step time; GEMM GFLOP/s: best of 10 "
             "torch.mm in the worker, same threads, the step's compute dtype, on the dominant shape below"]
    for variant, r in rows:
        m, k, n = r["gemm_shape"]
        dtype = "bf16" if "bf16" in variant else "fp32"
        lines.append(f"  {variant}: GEMM {m}x{k} @ {k}x{n} {dtype}; plain GEMMs are {100 * r['gemm_share']:.1f}% of "
                     f"the step's counted FLOPs")
    return lines


def summary_table() -> str:
    lines = []
    for device, suffix in (("cpu", ""), ("cuda", " (cuda)")):
        rows = [(v, RESULTS[v]) for v in VARIANTS if v in RESULTS and "s" in RESULTS[v]
                and VARIANTS[v]["device"] == device]
        if not rows:
            continue
        base = RESULTS.get(BASELINE + suffix, {})
        memory = "RSS" if device == "cpu" else "max_memory_allocated"
        lines.append(f"{PRESET} training step on {device}, batch {rows[0][1]['batch']}, "
                     f"{rows[0][1]['threads']} threads (s/step: median of the steady-state rounds; peak step MB = "
                     f"peak {memory} during the step minus before it; first = the warm-up step; CPU s = the "
                     f"worker's CPU time per steady step, all threads)")
        lines.append(f"{'variant':28s} {'rounds':>6s} {'s/step':>8s} {'clips/s':>8s} {'peak step MB':>13s} "
                     f"{'x clips/s':>10s} {'x memory':>9s} {'first s':>8s} {'first MB':>9s} {'CPU s':>7s} "
                     f"{'x CPU':>6s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'GEMM GFLOP/s':>12s} "
                     f"{'of GEMM peak':>12s}")
        for variant, r in rows:
            speed, mem, cpu = _ratios(r, base)
            lines.append(f"{variant:28s} {r['rounds']:6d} {r['s']:8.2f} {r['batch'] / r['s']:8.3f} "
                         f"{r['peak_mb']:13.0f} {cell(speed, '10.2f')} {cell(mem, '9.2f')} {r['first_s']:8.2f} "
                         f"{r['first_peak_mb']:9.0f} {r['cpu_s']:7.1f} {cell(cpu, '6.2f')} "
                         f"{r['flops'] / 1e9:10.0f} {r['achieved_flops_s'] / 1e9:8.1f} "
                         f"{r['gemm_flops_s'] / 1e9:12.1f} {r['of_gemm_peak']:12.2f}")
            if "loss_vs_fp32" in r:
                lines.append(f"  {variant}: first-step loss within {r['loss_vs_fp32']:.1e} relative of fp32")
        lines.extend(_limits_notes(rows))
        ours = RESULTS.get("ours fp32" + suffix, {})
        if "of_gemm_peak" in ours:
            target = ours["of_gemm_peak"] >= 0.7
            lines.append(f"target ours fp32 FLOP/s vs this machine's fp32 GEMM: {ours['of_gemm_peak']:.2f} (>= 0.7) "
                         f"{'met' if target else 'NOT met (python benchmarks/profile_step.py names the rest)'}")
        speed, mem, cpu = _ratios(RESULTS.get("ours fp32" + suffix, {}), base)
        if speed and mem:
            lines.append(f"target ours fp32 clips/s vs baseline: {speed:.2f}x (>= 2) "
                         f"{'met' if speed >= 2 else 'NOT met'} (clips per CPU-second: {cpu:.2f}x)")
            lines.append(f"target ours fp32 peak step memory vs baseline: {mem:.2f}x (<= 0.7) "
                         f"{'met' if mem <= 0.7 else 'NOT met'}")
        check = RESULTS.get("_check" + suffix)
        if check:
            lines.append(f"same function: losses within {check['loss_rel_err']:.1e} relative, gradients within "
                         f"{check['grad_rel_err']:.1e} of each parameter's largest gradient")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2])
