"""Every Triton kernel variant the package launches, compiled ahead of time for sm_90a and sm_80.

No GPU is needed: Triton's pipeline runs down to a cubin with its bundled ptxas, and the
registers, spills, shared memory and MMA instructions are read from the result (see
m2clip_fast.kernels.aot). The launch arguments come from the package's own launchers on a k400
batch, so the specialisation (divisibility by 16, constexprs, autotune pruning) is what a GPU
run would compile. About 1.5 min on 2 cores cold; reruns hit the Triton cache in
~/.cache/m2clip_fast/triton_aot. Run alone with ``pytest -m aot``.
"""
import contextlib
import importlib.util
from collections import defaultdict

import pytest

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

# Bytes per thread: a register or two spilled around a loop costs nothing measurable; more means
# a tile too big for the register file.
SPILL_BOUND = 16


@pytest.fixture(scope="module")
def results(request):
    from m2clip_fast.kernels import aot

    out = aot.compile_all(workers=2)
    # Shown even under output capture: the table is this test's report, pass or fail.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + aot.format_table(out) + "\n" + aot.summary(out))
    return out


def _where(r):
    v = r.variant
    return f"{v.kernel} {r.config} {v.target} {v.dtype}"


def test_every_variant_is_enumerated(results):
    from m2clip_fast.kernels import aot

    kernels = {r.variant.kernel for r in results}
    assert kernels == {"stencil_fwd", "stencil_bwd", "stencil_bwd_no_s", "up_gemm"}
    for kernel in kernels:
        combos = {(r.variant.target, r.variant.dtype) for r in results if r.variant.kernel == kernel}
        assert combos == {(t, d) for t, _, _ in aot.TARGETS for d in aot.DTYPES}, kernel
    # fp32 GEMMs: both the plain-fp32 and the TF32 path (torch's switch decides at run time).
    assert {r.variant.precision for r in results if r.variant.kernel == "up_gemm" and r.variant.dtype == "float32"} \
        == {"ieee", "tf32"}


def test_all_compile(results):
    failed = [f"{_where(r)}: {r.error}" for r in results if r.error]
    assert not failed, "\n".join(failed)


def test_no_spills(results):
    # The package's comments promise spill-free configs in every dtype; fp16/bf16 are the ones
    # that train at speed, fp32 is held to the same bound.
    spilling = [f"{_where(r)}: {r.spills} B/thread" for r in results if not r.error and r.spills > SPILL_BOUND]
    assert not spilling, "\n".join(spilling)


def test_tensor_core_gemms(results):
    for r in results:
        v = r.variant
        if v.kernel != "up_gemm" or r.error or v.precision == "ieee":
            continue
        expected = "wgmma" if v.target == "sm_90a" else "mma"
        assert r.mma == expected, f"{_where(r)}: {r.mma or 'no tensor-core instruction'}"


def test_shared_memory_fits(results):
    groups = defaultdict(list)
    for r in results:
        if not r.error:
            groups[(r.variant.kernel, r.variant.target, r.variant.dtype, r.variant.precision)].append(r)
    for key, rs in groups.items():
        assert any(r.shared <= r.shared_limit for r in rs), f"no config of {key} fits shared memory"
    # Stricter than launchability: the autotuner would skip an oversized config, but compiling it
    # on every new shape is wasted time, so none is kept.
    oversized = [f"{_where(r)}: {r.shared} B > {r.shared_limit}" for r in results
                 if not r.error and r.shared > r.shared_limit]
    assert not oversized, "\n".join(oversized)
