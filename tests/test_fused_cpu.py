"""FusedTEDAdapter on the C++ CPU path against the reference TEDAdapter.

Everything except the missing-extension notice runs the real extension; those tests are skipped,
with the reason, only when ``m2clip_fast._C`` is not built.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from m2clip_fast import fused, ted_cpu
from m2clip_fast.adapters import TEDAdapter
from m2clip_fast.fused import FusedTEDAdapter, extension_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import saved_storages  # noqa: E402  (shared with the benchmarks' saved-bytes column)
from m2clip_fast.tolerance import assert_within_reference_error  # noqa: E402

needs_ext = pytest.mark.skipif(
    not extension_available(),
    reason="m2clip_fast._C is not built (pip install --no-build-isolation -e .); the CPU fused path cannot run",
)



def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled, so no gradient is trivially zero (fresh convs are zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.shape[1] ** -0.5 if p.dim() == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return module


def pair(dim, r, frames, grid, seed=0, backend="cpu", **kw):
    ref = randomised(TEDAdapter(dim, r, frames, grid=grid), seed)
    fast = FusedTEDAdapter(dim, r, frames, grid=grid, backend=backend, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _triton_runs_here() -> bool:
    try:
        from m2clip_fast.kernels import ted
    except ImportError:
        return False
    return ted.triton_available()


# Both fused backends, for the contracts they share (fallbacks, double backward). Triton runs CPU
# tensors in its interpreter (TRITON_INTERPRET=1, set by conftest before triton is imported).
FUSED_BACKENDS = [
    pytest.param("cpu", marks=needs_ext),
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_runs_here(), reason="Triton cannot run here")),
]


def tokens(batch, frames, grid, dim, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch * frames, 1 + grid[0] * grid[1], dim, generator=gen, dtype=torch.float64).to(dtype)


def run(module, x, grad, residual=None, frames=None):
    """Output and every gradient (x, residual if given, all parameters) of one forward + backward."""
    x = x.detach().clone().requires_grad_()
    res = None if residual is None else residual.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x, num_frames=frames, residual=res)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad, **({"residual": res.grad} if res is not None else {})}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def output_and_gradients(module, x, grad, residual=None, frames=None):
    """{"output": ..., "grad <name>": ...} of ``run``."""
    out, grads = run(module, x, grad, residual, frames)
    return {"output": out, **{f"grad {name}": g for name, g in grads.items()}}


def assert_like_reference(got, ref, exact, what, zero=(), dtype=None):
    """got (the fused path) and ref (the eager TEDAdapter), both fp32, against exact (TEDAdapter in float64),
    name → tensor: the error model of m2clip_fast/tolerance.py. Every exact tensor must be nonzero, or the
    comparison would prove nothing, except those named in ``zero`` (exactly zero by construction). ``dtype``:
    the precision the paths compute in, for the 1-ulp floor (default: the reference output's dtype)."""
    assert got.keys() == ref.keys() == exact.keys(), what
    for name, want in exact.items():
        assert got[name] is not None, f"{what}: no {name}"
        assert got[name].dtype == ref[name].dtype, f"{what}: {name} is {got[name].dtype}, not {ref[name].dtype}"
        assert (torch.count_nonzero(want) == 0) == (name in zero), f"{what}: {name} all zero: {name in zero}"
    assert_within_reference_error(got, ref, exact, what, dtype=dtype)


def assert_fp32_like_reference(fast, ref, x, grad, residual=None, frames=None, zero=()):
    """Output and every gradient of ``fast`` within 2× the fp32 reference's own error vs float64."""
    double = None if residual is None else residual.double()
    exact = output_and_gradients(copy.deepcopy(ref).double(), x.double(), grad.double(), double, frames)
    assert_like_reference(output_and_gradients(fast, x, grad, residual, frames),
                          output_and_gradients(ref, x, grad, residual, frames), exact, "fp32", zero)


def assert_outputs_like_reference(got, ref, x, what="output"):
    """A forward-only output ``got`` = fast(x) within 2× ref(x)'s fp32 error vs ref in float64."""
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double())
        assert_like_reference({"output": got}, {"output": ref(x)}, {"output": exact}, what)


CASES = [  # batch, frames, grid, C, r, separate residual
    (1, 1, (7, 7), 72, 13, False),
    (2, 2, (6, 10), 100, 37, True),
    (1, 3, (7, 7), 64, 384, False),
    (2, 8, (14, 14), 96, 24, False),
    (1, 16, (6, 10), 40, 17, True),
    (2, 8, (7, 7), 200, 384, True),
]


@needs_ext
@pytest.mark.parametrize("batch,frames,grid,dim,r,separate", CASES)
def test_forward_and_every_gradient_match_reference_fp32(batch, frames, grid, dim, r, separate):
    ref, fast = pair(dim, r, frames, grid)
    x = tokens(batch, frames, grid, dim)
    residual = tokens(batch, frames, grid, dim, seed=2) if separate else None
    grad = tokens(batch, frames, grid, dim, seed=3)
    assert fast.select_backend(x) == "cpu"
    # one frame: every frame difference is 0, and so is down_d's gradient (in float64 too: exact zeros)
    assert_fp32_like_reference(fast, ref, x, grad, residual, zero=("grad down_d.weight",) if frames == 1 else ())


@pytest.fixture
def pinned_isa():
    """Pins the stencil to one compiled ISA variant for the test, then restores the one in use before
    (not "best": a run under M2CLIP_STENCIL_ISA keeps its variant for the tests after this one)."""
    before = ted_cpu._C.stencil_isa()

    def pin(name):
        try:
            ted_cpu._C.set_stencil_isa(name)
        except RuntimeError as exc:
            pytest.skip(f"this CPU cannot run the {name} variant: {exc}")

    yield pin
    ted_cpu._C.set_stencil_isa(before)


@needs_ext
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_isa_variant_matches_reference(isa, pinned_isa):
    pinned_isa(isa)
    assert ted_cpu._C.stencil_isa() == isa
    grid, dim, r, frames = (6, 10), 70, 45, 3  # r and C leave lane tails for every vector width
    ref, fast = pair(dim, r, frames, grid, seed=4)
    x, grad = tokens(2, frames, grid, dim, seed=5), tokens(2, frames, grid, dim, seed=6)
    assert_fp32_like_reference(fast, ref, x, grad)


@needs_ext
def test_stencil_isa_environment_variable(pinned_isa):  # the fixture restores the variant afterwards
    """M2CLIP_STENCIL_ISA pins the variant (read at import; here applied to a given environment); a name
    that is unknown, or that this CPU cannot run, is an error naming the variable, not another variant."""
    ted_cpu.apply_stencil_isa_from_env({ted_cpu.STENCIL_ISA_ENV: "baseline"})
    assert ted_cpu._C.stencil_isa() == "baseline"
    ted_cpu.apply_stencil_isa_from_env({ted_cpu.STENCIL_ISA_ENV: ""})  # empty: unset, nothing changes
    assert ted_cpu._C.stencil_isa() == "baseline"
    with pytest.raises(ted_cpu.StencilISAError, match="M2CLIP_STENCIL_ISA=sse9: .*unknown ISA 'sse9'"):
        ted_cpu.apply_stencil_isa_from_env({ted_cpu.STENCIL_ISA_ENV: "sse9"})
    ted_cpu.apply_stencil_isa_from_env({ted_cpu.STENCIL_ISA_ENV: "best"})
    best = ted_cpu._C.stencil_isa()
    if best != "avx512":
        with pytest.raises(ted_cpu.StencilISAError, match=f"this CPU cannot run 'avx512' \\(best is {best}\\)"):
            ted_cpu.apply_stencil_isa_from_env({ted_cpu.STENCIL_ISA_ENV: "avx512"})
        assert ted_cpu._C.stencil_isa() == best


@needs_ext
def test_stencil_runs_the_variant_the_environment_names():
    """Under M2CLIP_STENCIL_ISA (CI's per-ISA runs) the stencil really runs that variant in this process."""
    name = os.environ.get(ted_cpu.STENCIL_ISA_ENV, "").strip()
    if name in ("", "best"):
        pytest.skip(f"{ted_cpu.STENCIL_ISA_ENV} does not name one variant here")
    assert ted_cpu._C.stencil_isa() == name


def test_stencil_isa_environment_variable_is_read_at_import():
    """In a fresh process: the variable takes effect when ted_cpu is imported, and a bad value fails there."""
    code = "from m2clip_fast import ted_cpu; print(ted_cpu._C.stencil_isa() if ted_cpu._C else 'none')"
    root = str(Path(__file__).resolve().parents[1])

    def run_with(value):
        env = {**os.environ, ted_cpu.STENCIL_ISA_ENV: value, "PYTHONPATH": root}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    pinned = run_with("baseline")
    if not extension_available():
        assert pinned.returncode != 0 and "the C++ stencil is unavailable" in pinned.stderr
        return
    assert pinned.returncode == 0 and pinned.stdout.strip() == "baseline", pinned.stderr[-2000:]
    bad = run_with("nonsense")
    assert bad.returncode != 0
    assert "StencilISAError: M2CLIP_STENCIL_ISA=nonsense" in bad.stderr.strip().splitlines()[-1]


@needs_ext
def test_non_contiguous_input_and_num_frames_override():
    grid, dim, r = (7, 7), 48, 16
    ref, fast = pair(dim, r, 8, grid)  # built for 8 frames, called with 4
    x = tokens(2, 4, grid, dim).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    grad = tokens(2, 4, grid, dim, seed=7)
    assert_fp32_like_reference(fast, ref, x, grad, frames=4)


@needs_ext
def test_inference_outputs_are_independent_of_later_calls():
    """Under no_grad Z is scratch reused across calls; returned outputs must not be."""
    ref, fast = pair(64, 24, 4, (5, 5))
    x1, x2 = tokens(2, 4, (5, 5), 64, seed=20), tokens(1, 4, (5, 5), 64, seed=21)
    with torch.no_grad():
        first = fast(x1)
        kept = first.clone()
        second = fast(x2)
        assert torch.equal(first, kept)
    assert_outputs_like_reference(first, ref, x1, "first output")
    assert_outputs_like_reference(second, ref, x2, "second output")


@needs_ext
def test_partially_frozen_gradients():
    """Only what needs a gradient gets one (the GEMMs for the rest are skipped) and it is right."""
    grid, dim, r, frames = (7, 7), 64, 32, 4
    ref, fast = pair(dim, r, frames, grid)
    for module in (ref, fast):
        for name, p in module.named_parameters():
            p.requires_grad_(name.startswith("conv"))
    x, grad = tokens(1, frames, grid, dim), tokens(1, frames, grid, dim, seed=8)
    grads = []
    for module, dtype in ((ref, torch.float32), (fast, torch.float32), (copy.deepcopy(ref).double(), torch.float64)):
        module.zero_grad(set_to_none=True)
        module(x.to(dtype)).backward(grad.to(dtype))
        grads.append({n: p.grad for n, p in module.named_parameters()})
    trained = {n for n, g in grads[0].items() if g is not None}
    assert trained == {n for n, g in grads[1].items() if g is not None} == {n for n in grads[0] if n.startswith("conv")}
    want, got, exact = ({n: g[n] for n in trained} for g in grads)
    assert_like_reference(got, want, exact, "partially frozen")


@needs_ext
@pytest.mark.parametrize("mode", ["autocast", "bf16_weights_and_inputs"])
def test_bf16_error_within_twice_pytorch_bf16_error(mode):
    """flash-attention's criterion, as m2clip_fast/tolerance.py words it: the fused path's error vs fp64 within
    2 × that of PyTorch's own bf16 run of TEDAdapter (+ 1 bf16 ulp), output and every gradient."""
    grid, dim, r, frames = (7, 7), 96, 48, 4
    ref, fast = pair(dim, r, frames, grid, seed=9)
    x, grad = tokens(2, frames, grid, dim, seed=10), tokens(2, frames, grid, dim, seed=11)
    if mode == "bf16_weights_and_inputs":
        ref, fast = ref.bfloat16(), fast.bfloat16()
        x, grad = x.bfloat16(), grad.bfloat16()
    exact = output_and_gradients(copy.deepcopy(ref).double(), x.double(), grad.double())
    assert fast.select_backend(x) == "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        got, want = output_and_gradients(fast, x, grad), output_and_gradients(ref, x, grad)
    assert got["output"].dtype == want["output"].dtype == x.dtype
    assert_like_reference(got, want, exact, mode, dtype=torch.bfloat16)


def saved_activation_bytes(module, x):
    """Bytes autograd saves for backward in module(x), parameters excluded (they live anyway)."""
    return sum(saved_storages(lambda: module(x.detach().clone().requires_grad_()), module.parameters()).values())


@needs_ext
@pytest.mark.parametrize("autocast", [False, True])
def test_saved_tensors_are_x_and_the_patch_rows_of_z(autocast):
    grid, dim, r, frames = (7, 7), 128, 64, 4
    ref, fast = pair(dim, r, frames, grid)
    x = tokens(2, frames, grid, dim)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused_bytes = saved_activation_bytes(fast, x)
        ref_bytes = saved_activation_bytes(ref, x)
    elem = 2 if autocast else 4
    patch_rows = x.shape[0] * (x.shape[1] - 1)
    assert fused_bytes == x.numel() * elem + patch_rows * 2 * r * elem  # x and Z's patch rows, GEMM dtype
    # The fp32 reference keeps x, the C-wide frame differences and each branch's two r-wide
    # intermediates (the D branch's on patch rows only): with C = 2r, exactly twice the fused adapter.
    # Under autocast it also keeps bf16 copies of its GEMM inputs.
    if autocast:
        assert ref_bytes > 2 * fused_bytes
    else:
        assert ref_bytes == 2 * fused_bytes


def test_state_dict_round_trips_both_ways():
    ref = randomised(TEDAdapter(40, 12, 4, grid=(3, 5)), 12)
    fast = FusedTEDAdapter(40, 12, 4, grid=(3, 5))
    fast.load_state_dict(ref.state_dict())
    back = TEDAdapter(40, 12, 4, grid=(3, 5))
    back.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys() == back.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    x = tokens(1, 4, (3, 5), 40)
    with torch.no_grad():
        assert_outputs_like_reference(fast(x), ref, x, "output after loading")


def test_reference_backend_is_silent_and_exact():
    ref = randomised(TEDAdapter(32, 8, 2, grid=(3, 3)), 13)
    slow = FusedTEDAdapter(32, 8, 2, grid=(3, 3), backend="reference")
    slow.load_state_dict(ref.state_dict())
    x = tokens(1, 2, (3, 3), 32)
    assert slow.select_backend(x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(slow(x), ref(x))


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ted_cpu, "_C", None)
    monkeypatch.setattr(fused, "_NOTICES_SHOWN", set())
    assert not extension_available()
    ref = randomised(TEDAdapter(32, 8, 2, grid=(3, 3)), 14)
    auto = FusedTEDAdapter(32, 8, 2, grid=(3, 3))
    auto.load_state_dict(ref.state_dict())
    x = tokens(1, 2, (3, 3), 32)
    with pytest.warns(RuntimeWarning, match="m2clip_fast._C not built") as record:
        out = auto(x)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert torch.equal(out, ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        auto(x)
    explicit = FusedTEDAdapter(32, 8, 2, grid=(3, 3), backend="cpu")
    with pytest.raises(RuntimeError, match="not built"):
        explicit(x)


@needs_ext
@pytest.mark.parametrize("kw", [dict(enhance=False), dict(difference=False), dict(spatial_kernel=5),
                                dict(temporal_kernel=1)])
def test_uncovered_configurations_use_reference(kw):
    ref = randomised(TEDAdapter(32, 8, 3, grid=(4, 4), **kw), 15)
    fast = FusedTEDAdapter(32, 8, 3, grid=(4, 4), backend="cpu", **kw)
    fast.load_state_dict(ref.state_dict())
    x = tokens(1, 3, (4, 4), 32)
    assert fast.select_backend(x) == "reference"
    assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_float64_input_uses_reference(backend):
    ref, fast = pair(32, 8, 2, (3, 3), backend=backend)
    ref, fast = ref.double(), fast.double()
    x = tokens(1, 2, (3, 3), 32, dtype=torch.float64)
    assert fast.select_backend(x) == "reference"
    assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_residual_of_another_dtype_uses_reference(backend):
    """The reference promotes residual + update (a float64 residual stream beside float32 tokens)."""
    ref, fast = pair(32, 8, 2, (3, 3), backend=backend)
    x, residual = tokens(1, 2, (3, 3), 32), tokens(1, 2, (3, 3), 32, seed=5, dtype=torch.float64)
    assert fast.select_backend(x, residual) == "reference"
    out = fast(x, residual=residual)
    assert out.dtype == torch.float64 and torch.equal(out, ref(x, residual=residual))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_func_over_parameters_uses_reference(backend):
    """Per-sample-gradient style: torch.func.grad through functional_call over the parameters."""
    ref, fast = pair(32, 8, 2, (3, 3), backend=backend)
    x = tokens(1, 2, (3, 3), 32)

    def loss(module):
        return lambda params: torch.func.functional_call(module, params, (x,)).square().sum()

    params = {k: v.detach() for k, v in ref.named_parameters()}
    got, want = torch.func.grad(loss(fast))(params), torch.func.grad(loss(ref))(params)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@needs_ext
def test_forward_mode_ad_uses_reference():
    ref, fast = pair(32, 8, 2, (3, 3))
    x, tangent = tokens(1, 2, (3, 3), 32), tokens(1, 2, (3, 3), 32, seed=16)
    jvps = []
    for module in (ref, fast):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, tangent)
            jvps.append(fwAD.unpack_dual(module(dual)).tangent)
    assert torch.equal(jvps[0], jvps[1])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_double_backward_raises(backend):
    _, fast = pair(32, 8, 2, (3, 3), backend=backend)
    x = tokens(1, 2, (3, 3), 32).requires_grad_()
    (gx,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@needs_ext
def test_functional_entry_point_validates_inputs():
    ref, _ = pair(32, 8, 2, (3, 3))
    p = dict(ref.named_parameters())
    args = [p[k] for k in ("down_e.weight", "down_e.bias", "conv_e.weight", "conv_e.bias", "up_e.weight",
                           "up_e.bias", "down_d.weight", "down_d.bias", "conv_d.weight", "conv_d.bias",
                           "up_d.weight", "up_d.bias")]
    x = tokens(1, 2, (3, 3), 32)
    with torch.no_grad():
        assert_outputs_like_reference(ted_cpu.ted_adapter_cpu(x, x, *args, 2, 3, 3), ref, x, "functional output")
        with pytest.raises(ValueError, match="residual"):
            ted_cpu.ted_adapter_cpu(x, x[:, :5], *args, 2, 3, 3)
        with pytest.raises(ValueError, match="1\\+h\\*w"):
            ted_cpu.ted_adapter_cpu(x, x, *args, 2, 2, 3)
        with pytest.raises(ValueError, match="num_frames"):
            ted_cpu.ted_adapter_cpu(x, x, *args, 3, 3, 3)
        bad = list(args)
        bad[8] = torch.zeros(8, 1, 5, 5)
        with pytest.raises(ValueError, match="kernel size 3"):
            ted_cpu.ted_adapter_cpu(x, x, *bad, 2, 3, 3)


def test_triton_backend_on_cpu_tensors_in_interpreter():
    """backend="triton" runs CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""
    ted = pytest.importorskip("m2clip_fast.kernels.ted")
    if not ted.triton_available():
        pytest.skip("Triton interpreter not active in this process (TRITON_INTERPRET=1 must precede import triton)")
    ref = randomised(TEDAdapter(32, 8, 2, grid=(3, 3)), 17)
    tri = FusedTEDAdapter(32, 8, 2, grid=(3, 3), backend="triton")
    tri.load_state_dict(ref.state_dict())
    x, grad = tokens(1, 2, (3, 3), 32), tokens(1, 2, (3, 3), 32, seed=18)
    assert tri.select_backend(x) == "triton"
    assert_fp32_like_reference(tri, ref, x, grad)


def test_stale_extension_is_named_not_called():
    """A _C built from older sources (no or another ABI_VERSION) is refused with the rebuild command."""
    from types import SimpleNamespace

    assert ted_cpu.stale_extension(SimpleNamespace(ABI_VERSION=ted_cpu.ABI_VERSION)) is None
    for old in (SimpleNamespace(), SimpleNamespace(ABI_VERSION=ted_cpu.ABI_VERSION - 1)):
        reason = ted_cpu.stale_extension(old)
        assert "out of date" in reason and "pip install --no-build-isolation -e ." in reason
    if extension_available():
        assert ted_cpu.stale_extension(ted_cpu._C) is None  # this build matches its sources


def test_unavailable_triton_raises_when_requested(monkeypatch):
    monkeypatch.setattr(fused, "_triton_entry", lambda: (None, "m2clip_fast.kernels.ted is not importable (test)"))
    x = tokens(1, 2, (3, 3), 32)
    with pytest.raises(RuntimeError, match="not importable"):
        FusedTEDAdapter(32, 8, 2, grid=(3, 3), backend="triton")(x)
    expected = "cpu" if extension_available() else "reference"
    assert FusedTEDAdapter(32, 8, 2, grid=(3, 3)).select_backend(x) == expected  # CPU never needs Triton
