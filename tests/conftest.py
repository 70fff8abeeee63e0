"""Shared set-up: the Triton interpreter flag, the thread count of the numeric tests, and a tiny real
encoded dataset written once per test session.

Without CUDA, Triton kernels can only run in its interpreter, and the interpreter choice is fixed when triton
is first imported (open_clip imports it indirectly): set it before anything else is imported.

``M2CLIP_TEST_THREADS=N`` runs the suite with torch.set_num_threads(N): GEMM blocking, and with it rounding,
depends on the thread count, so CI runs the numeric tests at 1 and 2 threads (.ci/run). Subprocesses that
tests start (the Triton interpreter re-run, torchrun) inherit the variable and this conftest.
``M2CLIP_STENCIL_ISA`` (read by m2clip_fast.ted_cpu) pins the C++ stencil's instruction set likewise.
"""
import os

import torch  # importing torch does not import triton

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

THREADS_ENV = "M2CLIP_TEST_THREADS"


def _test_threads():
    """The thread count asked for in M2CLIP_TEST_THREADS, or None when it is unset or empty."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_ENV}={value!r}: expected a positive whole number of threads")
    return int(value)


def pytest_configure(config):
    threads = _test_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if os.environ.get("M2CLIP_STENCIL_ISA", "").strip():  # a bad value stops the run here, not at collection
        try:
            import m2clip_fast.ted_cpu  # noqa: F401  (its import applies and checks the variable)
        except ValueError as exc:  # StencilISAError
            raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config):
    from m2clip_fast import ted_cpu

    isa = ted_cpu._C.stencil_isa() if ted_cpu._C is not None else f"none ({ted_cpu._IMPORT_ERROR})"
    return f"torch threads: {torch.get_num_threads()}, C++ stencil ISA: {isa}"


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """8 motion classes, 2 training + 1 validation H.264 videos each, 8 frames of 32x32."""
    from m2clip_fast.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, per_class=2, val_per_class=1, frames=8, size=32, seed=3)
    return out
