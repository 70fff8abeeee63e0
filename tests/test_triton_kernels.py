"""Triton TED-Adapter kernels against the reference ``TEDAdapter``: forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter. Triton picks interpreter vs compiler
when a function is *decorated*, reading TRITON_INTERPRET at that moment — for triton.language's
own jit helpers (tl.sum, tl.zeros) that is ``import triton`` itself. So the flag is set here before
anything imports triton. In a full pytest run an earlier test module may already have imported it
(``import m2clip_fast`` → open_clip → triton); the interpreter cannot be switched on after that, so
this module then re-runs itself in a fresh process (``test_in_fresh_interpreter_process``) and
skips its in-process copies.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU and "triton" not in sys.modules:
    # Only while it can still take effect: once triton is imported the flag would change nothing
    # here and would only leak into the subprocesses later tests start.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from m2clip_fast.adapters import TEDAdapter, frame_difference, temporal_conv  # noqa: E402
from m2clip_fast.kernels import ted, ted_matmul, ted_stencil  # noqa: E402
from m2clip_fast.tolerance import assert_within_reference_error  # noqa: E402

RUNNABLE_HERE = ON_GPU or ted.triton_available()
if not RUNNABLE_HERE and os.environ.get("M2CLIP_TRITON_TEST_CHILD") == "1":
    raise RuntimeError("fresh process with TRITON_INTERPRET=1 still cannot run the kernels in the interpreter")


def _child_env():
    env = dict(os.environ, TRITON_INTERPRET="1", M2CLIP_TRITON_TEST_CHILD="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # same m2clip_fast as this process
    return env


@pytest.fixture(autouse=True)
def _needs_usable_kernels(request):
    if not RUNNABLE_HERE and request.node.originalname != "test_in_fresh_interpreter_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; covered by test_in_fresh_interpreter_process")


@pytest.mark.skipif(RUNNABLE_HERE, reason="the kernels run in this process")
def test_in_fresh_interpreter_process():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=_child_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


DEVICE = "cuda" if ON_GPU else "cpu"
PARAMS = ("down_e.weight", "down_e.bias", "conv_e.weight", "conv_e.bias", "up_e.weight", "up_e.bias",
          "down_d.weight", "down_d.bias", "conv_d.weight", "conv_d.bias", "up_d.weight", "up_d.bias")


def make_adapter(c, r, frames, h, w, seed=0):
    """fp64 TEDAdapter with every parameter random (the default init zeroes convs and biases)."""
    torch.manual_seed(seed)
    adapter = TEDAdapter(c, r, frames, grid=(h, w)).double().to(DEVICE)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.normal_(0.0, 1.0 / fan_in ** 0.5)
    return adapter


def make_tokens(batch, frames, h, w, c, correlation=0.0, seed=1):
    """(B·T, 1+h·w, C) fp64 tokens; correlation > 0 makes consecutive frames alike, as in real video,
    which is where Z_t − Z_{t−1} in low precision could lose to the reference's x_t − x_{t−1}."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, 1 + h * w, c)
    shared = torch.randn((batch, 1) + shape[2:], generator=g, dtype=torch.float64)
    own = torch.randn(shape, generator=g, dtype=torch.float64)
    x = correlation * shared + (1 - correlation ** 2) ** 0.5 * own
    return x.reshape(batch * frames, *shape[2:]).to(DEVICE)


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def run_reference(adapter, x, residual, grad_out, frames, dtype):
    """Output and grads (x, residual, 12 parameters) of TEDAdapter run entirely in ``dtype``."""
    module = copy.deepcopy(adapter).to(dtype)
    x, residual = leaf(x, dtype), leaf(residual, dtype)
    params = [dict(module.named_parameters())[n] for n in PARAMS]
    with torch.backends.cudnn.flags(allow_tf32=False):  # cuDNN's TF32 default would blur fp32 on GPU
        out = module(x, num_frames=frames, residual=residual)
        return [out, *torch.autograd.grad(out, [x, residual, *params], grad_out.to(dtype))]


def run_triton(adapter, x, residual, grad_out, frames, h, w, dtype, param_dtype=None, same_residual=False):
    """Same as run_reference through ted_adapter_triton; parameters in ``param_dtype`` (masters)."""
    x = leaf(x, dtype)
    residual = x if same_residual else leaf(residual, dtype)
    params = [leaf(dict(adapter.named_parameters())[n], param_dtype or dtype) for n in PARAMS]
    out = ted.ted_adapter_triton(x, residual, *params, frames, h, w)
    inputs = [x, *params] if same_residual else [x, residual, *params]
    grads = list(torch.autograd.grad(out, inputs, grad_out.to(dtype)))
    if same_residual:  # one tensor, one gradient: d/dx of (x + update(x)) holds both terms
        grads.insert(1, None)
    return [out, *grads]


NAMES = ("out", "x", "residual") + PARAMS

SHAPES = [
    # B, T, h, w, C, r
    pytest.param(1, 1, 7, 7, 40, 17, id="T1-7x7-C40-r17"),  # no temporal neighbours: D is b_d only
    pytest.param(2, 2, 2, 3, 72, 16, id="T2-2x3-C72-r16"),
    pytest.param(1, 3, 6, 10, 40, 32, id="T3-6x10-C40-r32"),
    pytest.param(2, 8, 2, 3, 72, 17, id="T8-2x3-C72-r17"),
]


@pytest.mark.parametrize("same_residual", [False, True], ids=["residual", "residual-is-x"])
@pytest.mark.parametrize("batch,frames,h,w,c,r", SHAPES)
def test_fp32_matches_reference(batch, frames, h, w, c, r, same_residual):
    adapter = make_adapter(c, r, frames, h, w)
    x = make_tokens(batch, frames, h, w, c)
    residual = x if same_residual else make_tokens(batch, frames, h, w, c, seed=2)
    grad_out = torch.randn_like(x)
    ref, ref64 = (run_reference(adapter, x, residual, grad_out, frames, dtype)
                  for dtype in (torch.float32, torch.float64))
    if same_residual:  # the reference saw x and residual as two leaves: their grads add up
        for r in (ref, ref64):
            r[1] = r[1] + r.pop(2)
    ours = run_triton(adapter, x, residual, grad_out, frames, h, w, torch.float32, same_residual=same_residual)
    if same_residual:
        ours.pop(2)
    names = [n for n in NAMES if not (same_residual and n == "residual")]
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
    assert_like_pytorch(ours, ref, ref64, names, torch.float32)


def assert_like_pytorch(ours, ref_low, ref64, names, dtype):
    """flash-attention's rule, as m2clip_fast/tolerance.py words it: the error vs fp64 of every tensor (output and
    gradients, lists in the order of ``names``; None entries skipped) within 2 × the pooled relative error
    of TEDAdapter run in ``dtype`` + 1 ulp of ``dtype``."""
    keep = [i for i, a in enumerate(ours) if a is not None]
    got, ref, exact = ({names[i]: t[i] for i in keep} for t in (ours, ref_low, ref64))
    assert_within_reference_error(got, ref, exact, f"Triton {dtype}", dtype=dtype)


# bf16 runs in the interpreter too, for the right reason: both kernels cast every fp16/bf16 load
# to fp32 before any arithmetic (the interpreter's own bf16 arithmetic, and its tl.dot on bf16,
# operate on raw uint16 bit patterns). The up-GEMM does that cast only under the interpreter;
# on a GPU its dot takes bf16 operands natively with fp32 accumulation — the same products.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch,frames,h,w,c,r,correlation", [
    pytest.param(2, 3, 2, 3, 40, 17, 0.0, id="T3-2x3-C40-r17"),
    pytest.param(1, 4, 6, 10, 72, 32, 0.99, id="T4-6x10-C72-r32-correlated"),
])
def test_low_precision_within_pytorch_error(batch, frames, h, w, c, r, correlation, dtype):
    adapter = make_adapter(c, r, frames, h, w)
    x = make_tokens(batch, frames, h, w, c, correlation)
    residual = make_tokens(batch, frames, h, w, c, seed=2)
    grad_out = torch.randn_like(x)
    ref64 = run_reference(adapter, x, residual, grad_out, frames, torch.float64)
    ref_low = run_reference(adapter, x, residual, grad_out, frames, dtype)
    ours = run_triton(adapter, x, residual, grad_out, frames, h, w, dtype)
    for name, a in zip(NAMES, ours):
        assert a.dtype == dtype, name
    assert_like_pytorch(ours, ref_low, ref64, NAMES, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_master_weights_with_low_precision_tokens(dtype):
    batch, frames, h, w, c, r = 2, 2, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w)
    x = make_tokens(batch, frames, h, w, c, correlation=0.9)
    residual = make_tokens(batch, frames, h, w, c, seed=2)
    grad_out = torch.randn_like(x)
    ref64 = run_reference(adapter, x, residual, grad_out, frames, torch.float64)
    ref_low = run_reference(adapter, x, residual, grad_out, frames, dtype)
    ours = run_triton(adapter, x, residual, grad_out, frames, h, w, dtype, param_dtype=torch.float32)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, g in zip(PARAMS, ours[3:]):
        assert g.dtype == torch.float32, f"{name} grad should come back in the master dtype"
    assert_like_pytorch(ours, ref_low, ref64, NAMES, dtype)


@pytest.mark.parametrize("frames,h,w,r", [(3, 2, 3, 17), (1, 3, 3, 16), (4, 3, 2, 5)])
def test_stencil_forward_matches_reference_convs(frames, h, w, r):
    """S straight from the kernel against TEDAdapter's own conv pieces (localises stencil bugs)."""
    batch, c = 2, 24
    adapter = make_adapter(c, r, frames, h, w).float()
    x = make_tokens(batch, frames, h, w, c).float()
    with torch.no_grad():
        z = torch.cat([adapter.down_e(x), x @ adapter.down_d.weight.t()], dim=-1).reshape(-1, 2 * r)
        s = ted_stencil.ted_stencil_forward(z, adapter.conv_e.weight, adapter.conv_e.bias, adapter.conv_d.weight,
                                            adapter.conv_d.bias, adapter.down_d.bias, frames, h, w)
        s_e = temporal_conv(adapter.down_e(x), adapter.conv_e, batch, frames).reshape(-1, r)
        diff = frame_difference(x[:, 1:].reshape(batch, frames, h * w, c)).reshape(-1, h * w, c)
        grid = adapter.down_d(diff).transpose(1, 2).reshape(-1, r, h, w)
        s_d = adapter.conv_d(grid).reshape(-1, r, h * w).transpose(1, 2)
        s_d = torch.cat([torch.zeros_like(s_d[:, :1]), s_d], dim=1).reshape(-1, r)
    # Both sides take the same Z (one 24-term GEMM) and differ only in the stencil's own sums of at most
    # 9 products of O(1) values: |error| ≤ 9·eps·Σ|terms|, a few 1e-6 at worst, within rtol = atol = 1e-5.
    torch.testing.assert_close(s[:, :r], s_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[:, r:], s_d, rtol=1e-5, atol=1e-5)


def test_stencil_backward_row_loop_matches_one_block_per_program(monkeypatch):
    """Backward programs walk several row blocks when rows outnumber them (always, at scale);
    one program walking all blocks must give the same dZ, S and reduced gradients."""
    frames, h, w, r = 3, 4, 5, 17
    g = torch.Generator().manual_seed(4)
    rows = 2 * frames * (1 + h * w)
    z, ds = (torch.randn(rows, 2 * r, generator=g).to(DEVICE) for _ in range(2))
    params = [torch.randn(shape, generator=g).to(DEVICE) for shape in [(r, 1, 3), (r,), (r, 1, 3, 3), (r,), (r,)]]
    wide = ted_stencil.ted_stencil_backward(z, ds, *params, frames, h, w)
    monkeypatch.setattr(ted_stencil, "_MAX_BWD_ROW_PROGRAMS", 1)
    looped = ted_stencil.ted_stencil_backward(z, ds, *params, frames, h, w)
    torch.testing.assert_close(looped[0], wide[0])  # row-local: the same operations, the default fp32 bound
    torch.testing.assert_close(looped[1], wide[1])
    # reductions over 126 rows of N(0,1) products in another order: addition k rounds by ≤ eps/2 of a partial
    # sum of size ~√k, ≤ Σ_k eps/2·√k ≈ (eps/3)·126^1.5 ≈ 6e-5 even if every rounding went the same way
    for name in wide[2]:
        torch.testing.assert_close(looped[2][name], wide[2][name], rtol=1e-5, atol=1e-4, msg=name)


def test_up_projection_epilogue_with_strided_residual():
    """Class rows get b_ue only, patch rows b_ue + b_ud; residual read through its own strides."""
    tokens, rows, k, n = 7, 7 * 11, 34, 72
    g = torch.Generator().manual_seed(3)
    s = torch.randn(rows, k, generator=g).to(DEVICE)
    w_up_t = torch.randn(k, n, generator=g).to(DEVICE)
    residual = torch.randn(n, rows, generator=g).to(DEVICE).t()  # column-major view
    # Biases as strided views (every other element of a packed buffer): the kernel reads unit stride.
    bias_e, bias_d = torch.randn(2, 2 * n, generator=g).to(DEVICE)[:, ::2]
    out = ted_matmul.ted_up_projection(s, w_up_t, residual, bias_e, bias_d, tokens)
    is_patch = (torch.arange(rows, device=DEVICE) % tokens != 0).float()[:, None]
    expected = residual + s @ w_up_t + bias_e + is_patch * bias_d
    # 34-term dots of N(0,1) values summed in another order: as above, ≤ (eps/3)·34^1.5 ≈ 1e-5 < atol
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16], ids=["params-fp32", "params-fp16"])
def test_saved_tensors_are_x_and_z_only(param_dtype):
    batch, frames, h, w, c, r = 2, 3, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w)
    x = leaf(make_tokens(batch, frames, h, w, c), torch.float16)
    residual = leaf(make_tokens(batch, frames, h, w, c, seed=2), torch.float16)
    params = [leaf(dict(adapter.named_parameters())[n], param_dtype) for n in PARAMS]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ted.ted_adapter_triton(x, residual, *params, frames, h, w)
    # Parameters are leaves alive for the whole step: saving them costs no memory. Anything else
    # (a cast copy of a weight, S, an (M, C) intermediate) is new memory held until backward.
    param_ptrs = {p.data_ptr() for p in params}
    extra = [t for t in saved if t.data_ptr() not in param_ptrs]
    rows = batch * frames * (1 + h * w)
    budget = x.numel() * x.element_size() + rows * 2 * r * x.element_size()
    assert sum(t.numel() * t.element_size() for t in extra) <= budget
    assert sorted(tuple(t.shape) for t in extra) == sorted([tuple(x.shape), (rows, 2 * r)])
    assert any(t.data_ptr() == x.data_ptr() for t in extra), "x itself, not a copy, should be saved"
    out.float().sum().backward()  # the saved set suffices for a full backward
    assert all(p.grad is not None and p.grad.dtype == param_dtype for p in params)


@pytest.mark.parametrize("trainable", [
    pytest.param(PARAMS, id="adapter-only"),  # frozen input: no dx, no dW_down skipped wrongly
    pytest.param(("up_e.weight", "up_d.weight"), id="up-weights-only"),  # S without the stencil backward
    pytest.param(("x",), id="x-only"),
])
def test_partial_requires_grad(trainable):
    batch, frames, h, w, c, r = 1, 3, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w).float()
    x = make_tokens(batch, frames, h, w, c).float().requires_grad_("x" in trainable)
    grad_out = torch.randn_like(x)
    ref_params = dict(adapter.named_parameters())
    for n, p in ref_params.items():
        p.requires_grad_(n in trainable)
    ours_params = [ref_params[n].detach().clone().requires_grad_(n in trainable) for n in PARAMS]
    names = (["x"] if x.requires_grad else []) + [n for n in PARAMS if n in trainable]

    def eager_grads(module, tokens):
        params = dict(module.named_parameters())
        wanted = ([tokens] if tokens.requires_grad else []) + [params[n] for n in PARAMS if n in trainable]
        return torch.autograd.grad(module(tokens, num_frames=frames), wanted, grad_out.to(tokens.dtype))

    ref = eager_grads(adapter, x)
    exact = eager_grads(copy.deepcopy(adapter).double(), x.detach().double().requires_grad_(x.requires_grad))
    wanted_ours = ([x] if x.requires_grad else []) + [p for n, p in zip(PARAMS, ours_params) if n in trainable]
    out = ted.ted_adapter_triton(x, x, *ours_params, frames, h, w)
    ours = torch.autograd.grad(out, wanted_ours, grad_out)
    assert_like_pytorch(ours, ref, exact, names, torch.float32)


def test_autocast_does_not_change_precision_policy():
    """Under a caller's autocast (the model runs its entry points in one) the op still computes in
    x.dtype: fp32 tokens give the fp32 result and fp32 gradients, not a bf16-GEMM approximation."""
    batch, frames, h, w, c, r = 1, 2, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w)
    x = make_tokens(batch, frames, h, w, c)
    grad_out = torch.randn_like(x)
    plain = run_triton(adapter, x, x, grad_out, frames, h, w, torch.float32, same_residual=True)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        cast = run_triton(adapter, x, x, grad_out, frames, h, w, torch.float32, same_residual=True)
    for name, a, b in zip(NAMES, cast, plain):
        if a is not None:
            assert a.dtype == torch.float32, name
            # the same kernels on the same fp32 operands: only a bf16 GEMM sneaking in could differ, by
            # ~1e-2 relative; 1e-6 of the largest magnitude (8 ulps) tells the two apart on any machine
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=name)


def test_residual_is_x_folds_its_gradient_into_dx(monkeypatch):
    """x passed as its own residual: backward returns dx + g through one addmm, none for residual."""
    batch, frames, h, w, c, r = 1, 2, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w).float()
    params = [dict(adapter.named_parameters())[n].detach() for n in PARAMS]
    x = make_tokens(batch, frames, h, w, c).float().requires_grad_()
    seen = []
    backward = ted.TEDTritonFunction.backward
    monkeypatch.setattr(ted.TEDTritonFunction, "backward",
                        staticmethod(lambda ctx, g: seen.append(backward(ctx, g)) or seen[-1]))
    ted.ted_adapter_triton(x, x, *params, frames, h, w).sum().backward()
    assert seen and seen[0][1] is None and seen[0][0] is not None


def test_rejects_inconsistent_inputs():
    frames, h, w, c, r = 2, 2, 3, 40, 17
    adapter = make_adapter(c, r, frames, h, w).float()
    params = [dict(adapter.named_parameters())[n].detach() for n in PARAMS]
    x = make_tokens(1, frames, h, w, c).float()
    with pytest.raises(ValueError, match="grid"):
        ted.ted_adapter_triton(x, x, *params, frames, 3, 3)  # 9 patches named, 6 present
    with pytest.raises(ValueError, match="multiple of num_frames"):
        ted.ted_adapter_triton(x, x, *params, 4, h, w)
    with pytest.raises(ValueError, match="residual"):
        ted.ted_adapter_triton(x, x[:, 1:], *params, frames, h, w)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ted.ted_adapter_triton(x.double(), x.double(), *params, frames, h, w)
    bad = list(params)
    bad[PARAMS.index("conv_d.weight")] = torch.zeros(r, 1, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="conv_d_w"):
        ted.ted_adapter_triton(x, x, *bad, frames, h, w)


@pytest.mark.parametrize("api", ["legacy", "matmul", "global"])
def test_tf32_policy_read_through_either_api(api):
    """torch ≥ 2.9 raises on reading allow_tf32 once the fp32_precision API was used."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch predates the fp32_precision API")
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    try:
        for tf32 in (True, False):
            if api == "legacy":
                matmul.allow_tf32 = tf32
            elif api == "matmul":
                matmul.fp32_precision = "tf32" if tf32 else "ieee"
            else:
                matmul.fp32_precision = "none"
                torch.backends.fp32_precision = "tf32" if tf32 else "ieee"
            assert ted_matmul.fp32_matmul_uses_tf32() is tf32
    finally:
        matmul.fp32_precision, torch.backends.fp32_precision = saved


def test_triton_available_here():
    assert ted.triton_available()
    assert ted._kernels_interpreted() == (not ON_GPU)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU interpreter's import-order trap")
def test_flag_set_after_triton_import_is_reported_not_run():
    """TRITON_INTERPRET set after ``import triton`` cannot take effect: triton_available() must say
    so on a CPU-only machine, and the entry point must fail with a message naming the fix."""
    script = textwrap.dedent("""
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from m2clip_fast.kernels import ted
        os.environ["TRITON_INTERPRET"] = "1"
        assert not ted.triton_available()
        x = torch.randn(2, 7, 8)
        p = [torch.randn(s) for s in [(4, 8), (4,), (4, 1, 3), (4,), (8, 4), (8,),
                                      (4, 8), (4,), (4, 1, 3, 3), (4,), (8, 4), (8,)]]
        try:
            ted.ted_adapter_triton(x, x, *p, 2, 2, 3)
        except RuntimeError as exc:
            assert "TRITON_INTERPRET" in str(exc), exc
        else:
            raise SystemExit("launched compiled kernels on CPU tensors")
    """)
    env = _child_env()
    env.pop("TRITON_INTERPRET")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
