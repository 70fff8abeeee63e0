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


@pytest.fixture(scope="session")
def demo_checkpoint(synthetic_dataset, tmp_path_factory):
    """A small untrained demo model (4 frames, stride 1) over the synthetic classes, saved as train saves model
    checkpoints (engine.model_checkpoint + atomic_save): what predict, extract, export and the report read."""
    import torch

    from m2clip_fast.engine import atomic_save, model_checkpoint
    from m2clip_fast.model import create_model
    from m2clip_fast.text import load_class_names

    torch.manual_seed(0)
    names = load_class_names(synthetic_dataset / "classes.txt")
    model = create_model("demo", pretrained=None, class_names=names, num_frames=4, ted_bottleneck=8,
                         text_bottleneck=8)
    model.config.train["stride"] = 1
    path = tmp_path_factory.mktemp("checkpoint") / "demo.pt"
    atomic_save(model_checkpoint(model, None), path)
    return path


@pytest.fixture(scope="session")
def demo_model(demo_checkpoint):
    """The model of ``demo_checkpoint``, loaded back in eval mode."""
    from m2clip_fast.engine import load_model_checkpoint

    model, _ = load_model_checkpoint(demo_checkpoint)
    return model.eval()
