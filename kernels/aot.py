"""Ahead-of-time compile of every Triton kernel variant the package launches, for a real GPU target,
on a machine without a GPU.

A variant is what ``JITFunction.run`` would compile: the kernel, one autotune config (after the
autotuner's own pruning), the constexprs and the argument specialisation (dtypes, integers equal
to 1 or divisible by 16, 16-byte-aligned pointers). The launch arguments are not written out by
hand: the package's own launchers (``ted_stencil_forward``, ``ted_stencil_backward``,
``ted_up_projection``) are called with CPU tensors of the benchmark shape, and the kernel objects'
``run`` is replaced by a recorder for the duration. Each variant then goes through Triton's whole
pipeline (TTIR → TTGIR → LLVM → PTX → cubin with the bundled ptxas) and reports registers, spills,
shared memory and whether its dots became tensor-core instructions.

Run in a process whose Triton was imported without TRITON_INTERPRET (the interpreter's autotuners
hold a single config); :func:`compile_all` starts such worker processes itself. Also runnable as
``python -m m2clip_fast.kernels.aot``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# (name, compute capability, opt-in shared memory per block in bytes). H100/H200: 227 KB; A100: 163 KB.
TARGETS = (("sm_90a", 90, 227 * 1024), ("sm_80", 80, 163 * 1024))
DTYPES = ("float32", "float16", "bfloat16")
# A Kinetics-400 batch on ViT-B/16: 2 clips × 8 frames, 1 + 14·14 tokens, C = 768, r = C/2.
K400_SHAPE = {"clips": 2, "frames": 8, "h": 14, "w": 14, "c": 768, "r": 384}
CACHE_DIR = Path.home() / ".cache" / "m2clip_fast" / "triton_aot"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launchable compile: which launcher, which config (index into its pruned list), dtype, target."""

    kernel: str  # "stencil_fwd", "stencil_bwd", "stencil_bwd_no_s", "up_gemm"
    config: int
    dtype: str
    target: str
    precision: str = ""  # the GEMM's INPUT_PRECISION for fp32 ("ieee" or "tf32"); "" otherwise


@dataclasses.dataclass(frozen=True)
class Result:
    variant: Variant
    config: str  # e.g. "BLOCK_M=32 BLOCK_R=64 w8 s3"
    registers: int = 0
    spills: int = 0  # bytes per thread
    shared: int = 0  # bytes per block
    shared_limit: int = 0
    mma: str = ""  # "wgmma", "mma", or "" (no tensor-core instruction in the SASS)
    error: str = ""


def _config_label(cfg) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


class _Recorder:
    """Stands in for a kernel's ``run``: keeps the call's arguments instead of launching."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, grid=None, warmup=False, **kwargs):
        self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(obj):
    recorder = _Recorder()
    obj.run = recorder  # instance attribute: __getitem__'s launcher looks it up on the instance
    try:
        yield recorder
    finally:
        del obj.run


def _launch_arguments(kernel: str, dtype: str, precision: str = ""):
    """(jit function, [config, ...], positional args, keyword args) of the package's launch of kernel.

    precision, when given, replaces the GEMM's INPUT_PRECISION: on CPU tensors the launcher always
    picks "ieee", on CUDA it follows torch's TF32 switch. It is set before the autotuner prunes,
    since the tile list depends on it.
    """
    import torch

    from . import ted_matmul, ted_stencil

    s = K400_SHAPE
    dt = getattr(torch, dtype)
    r, c, length = s["r"], s["c"], 1 + s["h"] * s["w"]
    m = s["clips"] * s["frames"] * length
    z = torch.zeros(m, 2 * r, dtype=dt)
    conv = (torch.zeros(r, 1, 3), torch.zeros(r), torch.zeros(r, 1, 3, 3), torch.zeros(r), torch.zeros(r))
    geometry = (s["frames"], s["h"], s["w"])
    if kernel == "stencil_fwd":
        tuner = ted_stencil._ted_stencil_forward_kernel
        with _recording(tuner) as rec:
            ted_stencil.ted_stencil_forward(z, *conv, *geometry)
    elif kernel in ("stencil_bwd", "stencil_bwd_no_s"):
        tuner = None
        with _recording(ted_stencil._ted_stencil_kernel) as rec:
            ted_stencil.ted_stencil_backward(z, torch.zeros_like(z), *conv, *geometry,
                                             recompute_s=kernel == "stencil_bwd")
    elif kernel == "up_gemm":
        tuner = ted_matmul._ted_up_kernel_tuned
        x = torch.zeros(m, c, dtype=dt)
        with _recording(tuner) as rec:
            ted_matmul.ted_up_projection(z, torch.zeros(2 * r, c, dtype=dt), x, torch.zeros(c), torch.zeros(c), length)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    (args, kwargs), = rec.calls
    if precision:
        kwargs = {**kwargs, "INPUT_PRECISION": precision}
    if tuner is None:  # a plain launch: the config is in the keyword arguments
        return ted_stencil._ted_stencil_kernel, [None], args, kwargs
    tuner.nargs = dict(zip(tuner.arg_names, args))
    return tuner.fn, tuner.prune_configs(kwargs), args, kwargs


def variants() -> list[Variant]:
    """Every (kernel, config, dtype, target[, precision]) the package can launch. Imports triton."""
    out = []
    for kernel in ("stencil_fwd", "stencil_bwd", "stencil_bwd_no_s", "up_gemm"):
        for dtype in DTYPES:
            # fp32 GEMMs follow torch's TF32 switch (ted_matmul.fp32_matmul_uses_tf32): both can launch.
            precisions = ("ieee", "tf32") if kernel == "up_gemm" and dtype == "float32" else ("",)
            for p in precisions:
                _, configs, _, _ = _launch_arguments(kernel, dtype, p)
                out.extend(Variant(kernel, i, dtype, target, p) for target, _, _ in TARGETS
                           for i in range(len(configs)))
    return out


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return ""


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread) of the cubin's kernel, read by the bundled cuobjdump.

    Triton reads both from the CUDA driver when it loads the binary (its ``n_spills`` is the
    function's local-memory size), which needs a GPU; cuobjdump reads the same ELF attributes:
    ptxas puts register spills in the stack frame, so local memory = STACK + LOCAL. None of these
    kernels has a local array or calls a function, so all of it is spill space.
    """
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    registers, stack, local = map(int, found.groups())
    return registers, stack + local


def compile_variant(v: Variant) -> Result:
    """Compile one variant with Triton's pipeline for its target; never raises (errors go in Result.error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    _, capability, limit = next(t for t in TARGETS if t[0] == v.target)
    fn, configs, args, kwargs = _launch_arguments(v.kernel, v.dtype, v.precision)
    cfg = configs[v.config]
    kwargs = dict(kwargs)
    if cfg is not None:
        kwargs.update(cfg.all_kwargs())
        label = _config_label(cfg)
    else:
        label = " ".join(f"{k}={kwargs[k]}" for k in ("BLOCK_M", "BLOCK_R")) + f" w{kwargs['num_warps']}"
    if v.precision:
        label += f" {v.precision}"
    try:
        target = GPUTarget("cuda", capability, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # a compile error is a finding, reported per variant
        first = str(exc).strip().splitlines()
        return Result(v, label, shared_limit=limit, error=f"{type(exc).__name__}: {first[0] if first else ''}")
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return Result(v, label, registers=registers, spills=spills, shared=compiled.metadata.shared,
                  shared_limit=limit, mma=_mma_kind(compiled.asm["ptx"]))


def _init_worker(cache_dir: str):
    # Before triton's first import in this process: the compiler, not the interpreter, and a cache
    # that outlives the run so a rerun only re-links.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before the AOT worker could configure it")


@contextlib.contextmanager
def _compiler_environment(cache_dir: Path):
    """The workers inherit the environment when they start: no interpreter flag, the AOT cache."""
    saved = dict(os.environ)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def compile_all(workers: int = 2, cache_dir: Path = CACHE_DIR) -> list[Result]:
    """Compile every variant in fresh worker processes (spawned: they import triton themselves,
    so this works from a process whose triton is the interpreter)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with _compiler_environment(cache_dir), concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(str(cache_dir),)) as pool:
        todo = pool.submit(variants).result()
        return list(pool.map(compile_variant, todo, chunksize=1))


def format_table(results: list[Result]) -> str:
    """One line per variant: kernel, config, target, dtype, registers, spills (B/thread), shared (KB), MMA."""
    head = f"{'kernel':<17} {'config':<50} {'target':<7} {'dtype':<9} {'regs':>4} {'spill':>6} {'smem KB':>8} mma"
    lines = [head, "-" * len(head)]
    for r in results:
        v = r.variant
        row = f"{v.kernel:<17} {r.config:<50} {v.target:<7} {v.dtype:<9} "
        if r.error:
            lines.append(row + f"ERROR {r.error}")
        else:
            over = " > limit" if r.shared > r.shared_limit else ""
            lines.append(row + f"{r.registers:>4} {r.spills:>6} {r.shared / 1024:>8.1f} {r.mma or '-'}{over}")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """Per kernel and target: variants, register range, worst spill, largest shared memory, MMA kinds."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.variant.kernel, r.variant.target), []).append(r)
    lines = []
    for (kernel, target), rs in groups.items():
        ok = [r for r in rs if not r.error]
        errors = len(rs) - len(ok)
        if not ok:
            lines.append(f"{kernel:<17} {target:<7} {len(rs)} variants, all failed to compile")
            continue
        regs = sorted(r.registers for r in ok)
        mma = "/".join(sorted({r.mma for r in ok if r.mma})) or "no MMA"
        lines.append(f"{kernel:<17} {target:<7} {len(rs):>2} variants: {regs[0]}–{regs[-1]} registers, "
                     f"max spill {max(r.spills for r in ok)} B/thread, max shared "
                     f"{max(r.shared for r in ok) / 1024:.0f} KB, {mma}"
                     + (f", {errors} compile errors" if errors else ""))
    return "\n".join(lines)


def main() -> int:
    results = compile_all()
    print(format_table(results))
    print(summary(results))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
