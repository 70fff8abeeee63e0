"""``python -m m2clip_fast.selftest [--device cpu|cuda] [--quick]``: check this installation on this machine.

Prints the environment (library versions, the C++ extension's build and ISA, the GPU), then runs each fast
path against its reference on the chosen device, in every dtype the path supports there: FusedTEDAdapter
forward and gradients against TEDAdapter, the attention backends against PyTorch's own attention, one
training step of the tiny model fused against unfused, and DALI decoding against PyAV. Prints a
PASS / FAIL / SKIP table; the exit status is 1 when any check fails.

Error model: the tests' (m2clip_fast.tolerance). The fast path and the reference both run in the dtype under
test, and both are compared with the reference computed in float64; every tensor of the fast path (output,
losses, gradients) must be within FACTOR × the reference's own pooled relative error + FLOOR_ULPS units of the
dtype's rounding error: as accurate as the reference, up to a small factor, and not merely close to it.

``--perturb`` is the self-test's own check: it adds half of each result's largest magnitude (1 to an all-zero
result) to one element of every fast-path result, so every tensor of every check that runs must then fail
(tests/test_selftest.py relies on it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import importlib.metadata
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cli import run_main

PROG = "python -m m2clip_fast.selftest"
PERTURBATION = 0.5  # of the largest magnitude, added to one element by --perturb: beyond any tolerance here


@dataclasses.dataclass
class Check:
    name: str
    dtype: str
    status: str  # "PASS", "FAIL" or "SKIP"
    detail: str
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- environment
def _version(module: str, dist: Optional[str] = None) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # an installed but broken package (e.g. built for another CUDA) says why
        return "not installed" if isinstance(exc, ModuleNotFoundError) else f"not importable ({exc})"
    version = getattr(mod, "__version__", None)
    if version is None and dist is not None:
        version = importlib.metadata.version(dist)
    return str(version)


def _extension() -> str:
    from . import ted_cpu

    if ted_cpu._C is None:
        return f"not available ({ted_cpu._IMPORT_ERROR})"
    return (f"{Path(ted_cpu._C.__file__).name}, ABI {ted_cpu._C.ABI_VERSION}, "
            f"stencil ISA {ted_cpu._C.stencil_isa()}")


def environment() -> List[Tuple[str, str]]:
    """(name, value) rows: versions or "not installed", the C++ extension, CUDA and the GPU."""
    cuda = torch.cuda.is_available()
    return [
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("CUDA (torch build)", torch.version.cuda or "none (CPU build)"),
        ("triton", _version("triton")),
        ("open_clip", _version("open_clip", "open_clip_torch")),
        ("DALI", _version("nvidia.dali")),
        ("xformers", _version("xformers")),
        ("C++ extension", _extension()),
        ("GPU", torch.cuda.get_device_name() if cuda else "none"),
    ]


# --------------------------------------------------------------------------------------------- error model
def _perturbed(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double().clone()
    scale = t.abs().max().item()
    t.view(-1)[0] += PERTURBATION * scale if scale > 0 else 1.0  # an all-zero result (a structural zero) too
    return t


@dataclasses.dataclass
class Comparison:
    """The tensors of one check, name → (fast, reference, float64), judged together by the tests' error model."""
    dtype: torch.dtype
    perturb: bool
    fast: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    reference: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    exact: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def add(self, name: str, fast: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
        self.fast[name] = _perturbed(fast) if self.perturb else fast.detach().cpu()
        self.reference[name], self.exact[name] = ref.detach().cpu(), exact.detach().cpu()

    def check(self, name: str) -> Check:
        from .tolerance import FACTOR, FLOOR_ULPS, max_error, reference_error_violations, relative_error

        dtype = str(self.dtype).replace("torch.", "")
        off = reference_error_violations(self.fast, self.reference, self.exact, dtype=self.dtype)
        rho_ref = relative_error(self.reference, self.exact)
        allowed = FACTOR * rho_ref + FLOOR_ULPS * torch.finfo(self.dtype).eps

        def rel(n):
            scale = self.exact[n].abs().max().item()
            return max_error(self.fast[n], self.exact[n]) / (scale if scale > 0 else 1.0)

        worst = max(self.exact, key=rel)
        summary = (f"worst {worst}: err {rel(worst):.1e} of max|exact|, allowed {allowed:.1e} "
                   f"({FACTOR:g} × reference's {rho_ref:.1e} + {FLOOR_ULPS:g} ulp)")
        if off:
            return Check(name, dtype, "FAIL", f"{len(off)} of {len(self.exact)} tensors off; {summary}")
        return Check(name, dtype, "PASS", f"{len(self.exact)} tensors; {summary}")


def _grad(p: torch.Tensor) -> torch.Tensor:
    # None where nothing reads the parameter (e.g. the last block's D branch when only class tokens go on)
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def _leaf(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device, dtype).detach().clone().requires_grad_(True)


def _autocast(device: torch.device, dtype: torch.dtype):
    """fp16/bf16 runs as the model runs them: fp32 master parameters under autocast."""
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------- TED adapter
def check_adapter(device: torch.device, dtype: torch.dtype, quick: bool, perturb: bool) -> Check:
    """FusedTEDAdapter (Triton on CUDA, C++ on CPU) against TEDAdapter: output and every gradient."""
    from .adapters import TEDAdapter
    from .fused import FusedTEDAdapter

    frames, side, dim, r = (4, 4, 64, 32) if quick else (8, 7, 128, 64)
    torch.manual_seed(0)
    fused = FusedTEDAdapter(dim, r, frames).to(device)
    with torch.no_grad():
        for p in fused.parameters():  # up projections start at zero: give every branch a signal
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * frames, 1 + side * side, dim, generator=g)
    grad_out = torch.randn(x.shape, generator=g)
    path = fused.select_backend(x.to(device, dtype))
    if path == "reference":
        return Check("TED adapter fwd+bwd", str(dtype).replace("torch.", ""), "SKIP",
                     f"no fused path for {dtype} on {device.type}")

    def run(module, dt, dev):
        xi = _leaf(x, dev, dt)
        with _autocast(dev, dt):
            out = module(xi)
        out.backward(grad_out.to(dev, out.dtype))
        return [out.detach(), xi.grad.detach(), *map(_grad, module.parameters())]

    reference = TEDAdapter(dim, r, frames).to(device)
    reference.load_state_dict(fused.state_dict())
    exact_module = copy.deepcopy(reference).cpu().double()
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in fused.named_parameters()]
    results = zip(names, run(fused, dtype, device), run(reference, dtype, device),
                  run(exact_module, torch.float64, torch.device("cpu")))
    cmp = Comparison(dtype, perturb)
    for name, fast, ref, exact in results:
        cmp.add(name, fast.cpu(), ref.cpu(), exact)
    return cmp.check(f"TED adapter fwd+bwd ({path})")


# --------------------------------------------------------------------------------------------- attention
def _attention_backends(device: torch.device) -> List[Tuple[str, Optional[str]]]:
    """(backend, reason it cannot run here or None)."""
    out = [("sdpa", None), ("math", None)]
    if device.type != "cuda":
        out.append(("xformers", "CUDA only"))
    elif _version("xformers") == "not installed" or _version("xformers").startswith("not importable"):
        out.append(("xformers", f"xformers {_version('xformers')}"))
    else:
        out.append(("xformers", None))
    return out


def check_attention(device: torch.device, dtype: torch.dtype, backend: str, quick: bool, perturb: bool) -> Check:
    """MultiheadAttention(backend) against nn.MultiheadAttention, without a mask and with the causal one."""
    from .attention import MultiheadAttention

    heads, dim, length = (2, 32, 9) if quick else (4, 64, 50)
    torch.manual_seed(0)
    fast = MultiheadAttention(dim, heads, batch_first=True, backend=backend).to(device, dtype)
    reference = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(device, dtype)
    reference.load_state_dict(fast.state_dict())
    exact_module = copy.deepcopy(reference).cpu().double()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, length, dim, generator=g)
    grad_out = torch.randn(q.shape, generator=g)
    causal = torch.full((length, length), float("-inf")).triu(1)  # open_clip's float text mask

    def run(module, dt, dev, mask):
        xi = _leaf(q, dev, dt)
        out = module(xi, xi, xi, need_weights=False, attn_mask=None if mask is None else mask.to(dev, dt))[0]
        out.backward(grad_out.to(dev, dt))
        return [out.detach(), xi.grad.detach(), *map(_grad, module.parameters())]

    cmp = Comparison(dtype, perturb)
    cpu = torch.device("cpu")
    for label, mask in (("no mask", None), ("causal", causal)):
        for m in (fast, reference, exact_module):
            m.zero_grad(set_to_none=True)
        names = [f"{label} output", f"{label} grad x"] + [f"{label} grad {n}" for n, _ in fast.named_parameters()]
        for name, a, b, e in zip(names, run(fast, dtype, device, mask), run(reference, dtype, device, mask),
                                 run(exact_module, torch.float64, cpu, mask)):
            cmp.add(name, a.cpu(), b.cpu(), e)
    return cmp.check(f"attention {backend}")


# --------------------------------------------------------------------------------------------- model step
CLASSES = ("moving left", "moving right", "rotating clockwise", "rotating anticlockwise", "growing")


def _tiny(fused: bool):
    from .model import create_model

    torch.manual_seed(0)
    # no VC dropout: the float64 twin would draw its mask from a different stream
    with _quiet():
        return create_model("tiny", pretrained=None, class_names=list(CLASSES), fused=fused, vc_dropout=0.0)


@contextlib.contextmanager
def _quiet():
    """Silence open_clip's random-init log line and warnings: the tiny model has no weights by design."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def check_model_step(device: torch.device, dtype: torch.dtype, quick: bool, perturb: bool) -> Check:
    """One training step (forward, every loss, backward) of the tiny model, fused against unfused."""
    fused, reference = _tiny(True).to(device).train(), _tiny(False).to(device).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # fresh adapters have zero up projections: most gradients would be exact zeros
        for p in fused.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    reference.load_state_dict(fused.state_dict())
    # float64 on the same device: the CMLM masks come from that device's generator
    exact_model = copy.deepcopy(reference).double()
    if dtype != torch.float32:
        fused.set_backbone_dtype(dtype)
        reference.set_backbone_dtype(dtype)
    size, frames = fused.image_size, fused.num_frames
    video = torch.randn(2, frames, 3, size, size, generator=g)
    labels = torch.tensor([1, 3])

    def step(model, dev, dt) -> Dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)  # the CMLM masks: the same draw for all three models
        losses = model(video.to(dev, dt), labels.to(dev))
        losses["loss"].backward()
        out = {f"loss {k}": v.detach() for k, v in losses.items()}
        out.update({f"grad {n}": _grad(p) for n, p in model.named_parameters() if p.requires_grad})
        return out

    with _quiet():
        fast, ref = step(fused, device, torch.float32), step(reference, device, torch.float32)
        exact = step(exact_model, device, torch.float64)
    cmp = Comparison(dtype, perturb)
    for name in exact:
        cmp.add(name, fast[name].cpu(), ref[name].cpu(), exact[name].cpu())
    return cmp.check("tiny model training step")


# --------------------------------------------------------------------------------------------- DALI
def check_dali(dali_device: str, quick: bool, perturb: bool) -> Check:
    """DALI's decode of a VP9 file written here against PyAV: each requested frame nearest to PyAV's frame of
    the same index, and equal to the independent BT.601 conversion of PyAV's YUV planes (data.decode.
    bilinear_bt601_rgb) within one level on DALI's CPU decoder. The GPU decoder's chroma filter is not
    documented, so there the mean difference must stay under one level: a wrong colour matrix, range or
    frame moves it by many."""
    from .data.dali import dali_available
    from .data.decode import bilinear_bt601_rgb, decode_all_frames
    from .data.frames import decode_frames
    from .data.synthetic import textured_frames, write_video

    name = f"DALI decode vs PyAV ({dali_device})"
    if not dali_available():
        return Check(name, "uint8", "SKIP", "NVIDIA DALI not installed")
    n = 8 if quick else 24
    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / "selftest.webm", textured_frames(n, 48, 64, seed=5), codec="vp9", gop=5)
        idx = [n - 1, 0, n // 2, n // 2, 3]
        out = decode_frames(path, idx, backend="dali", device=dali_device).cpu().double()
        reference = torch.from_numpy(bilinear_bt601_rgb(path))[idx]
        swscale = decode_all_frames(path).double()
    if perturb:
        out = _perturbed(out)
    diff = (out - reference).abs()
    level_err, allowed = (diff.max().item(), "max") if dali_device == "cpu" else (diff.mean().item(), "mean")
    nearest = [int((swscale - out[k]).abs().mean(dim=(1, 2, 3)).argmin()) for k in range(len(idx))]
    ok = level_err <= 1 and nearest == idx
    detail = (f"{len(idx)} of {n} frames: {allowed} {level_err:.2f} levels from BT.601 (allowed 1), "
              f"nearest PyAV frames {nearest} for {idx}")
    return Check(name, "uint8", "PASS" if ok else "FAIL", detail)


# --------------------------------------------------------------------------------------------- runner
def _dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    # fp16 only on CUDA: the CPU kernels (and oneDNN's fast GEMMs) are fp32 / bf16.
    if device.type == "cuda":
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32, torch.bfloat16)


def _guarded(name: str, dtype: str, fn: Callable[[], Check]) -> Check:
    """A check that raises is a FAIL with the error, not the end of the self-test."""
    start = time.perf_counter()
    try:
        check = fn()
    except Exception as exc:
        check = Check(name, dtype, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    check.seconds = time.perf_counter() - start
    return check


def run_checks(device: torch.device, quick: bool, perturb: bool) -> List[Check]:
    checks = []
    for dtype in _dtypes(device):
        label = str(dtype).replace("torch.", "")
        checks.append(_guarded("TED adapter fwd+bwd", label, lambda: check_adapter(device, dtype, quick, perturb)))
        for backend, reason in _attention_backends(device):
            if reason is not None:
                checks.append(Check(f"attention {backend}", label, "SKIP", reason))
                continue
            checks.append(_guarded(f"attention {backend}", label,
                                   lambda: check_attention(device, dtype, backend, quick, perturb)))
        if dtype != torch.float16:  # the tiny model's backbone runs in fp32 or bf16 (set_backbone_dtype)
            checks.append(_guarded("tiny model training step", label,
                                   lambda: check_model_step(device, dtype, quick, perturb)))
    # DALI's CPU decoder (VP8/VP9/MJPEG) runs everywhere; its GPU one ("mixed") where CUDA is
    for dali_device in ("cpu", "mixed") if device.type == "cuda" else ("cpu",):
        checks.append(_guarded(f"DALI decode vs PyAV ({dali_device})", "uint8",
                               lambda: check_dali(dali_device, quick, perturb)))
    return checks


def format_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'dtype':<8}  result  {'time':>5}  detail"]
    lines += [f"{c.name:<{width}}  {c.dtype:<8}  {c.status:<6}  {c.seconds:>4.1f}s  {c.detail}" for c in checks]
    return "\n".join(lines)


def _selftest(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch sees no GPU)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in environment():
        print(f"{name:<20}{value}")
    print(f"device              {device}{' (quick)' if args.quick else ''}"
          f"{'; --perturb: every check below must FAIL' if args.perturb else ''}\n")
    start = time.perf_counter()
    checks = run_checks(device, args.quick, args.perturb)
    print(format_table(checks))
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - start:.0f} s")
    return 1 if counts["FAIL"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and clips")
    parser.add_argument("--perturb", action="store_true",
                        help="self-check of the self-test: corrupt every fast-path result, so every check must FAIL")
    args = parser.parse_args(argv)
    return run_main(lambda: _selftest(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
