"""Shared fixtures: a tiny real encoded dataset written once per test session.

Without CUDA, Triton kernels can only run in its interpreter, and the interpreter choice is fixed when triton
is first imported (open_clip imports it indirectly): set it before anything else is imported.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """8 motion classes, 2 training + 1 validation H.264 videos each, 8 frames of 32x32."""
    from m2clip_fast.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, per_class=2, val_per_class=1, frames=8, size=32, seed=3)
    return out
