"""A training step must not wait for the device: no tensor → Python conversion inside forward/backward.

On CUDA each ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)`` or ``.cpu()`` blocks the host
until the GPU has caught up, which empties the launch queue every step. The step runs here on CPU, where
the same calls are visible: every such method of torch.Tensor is wrapped to record its caller, and the
test asserts that no call comes from the model's forward or backward.
"""
import contextlib
import traceback

import pytest
import torch

from m2clip_fast import create_model

FRAMES, SIZE = 4, 32
CLASSES = ["moving left", "moving right", "rotating clockwise", "rotating anticlockwise", "growing"]
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_conversions():
    """Yields a list that collects (method, innermost m2clip_fast or caller frame) of every conversion."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if "m2clip_fast" in f.filename]
            where = ours[-1] if ours else frames[-1]
            calls.append((name, f"{where.filename}:{where.lineno} {where.line}"))
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_training_step_has_no_host_sync(fused):
    torch.manual_seed(0)
    model = create_model("tiny", class_names=CLASSES, fused=fused,
                         loss_weights={"contrastive": 0.5, "cmc": 0.5, "vc": 1.0, "cmlm": 0.1}).train()
    assert model.config.cmlm and all(model.loss_weights.values())  # every head, CMLM included, runs
    video = torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 3])
    for step in range(2):  # the first step also fills the text cache and the CMLM class table
        with host_conversions() as calls:
            out = model(video, labels)
            out["loss"].backward()
        assert not calls, f"step {step}: " + "\n".join(f"{name} at {where}" for name, where in calls)
    # The counter itself sees conversions (so an empty list above means something):
    with host_conversions() as calls:
        float(out["loss"].detach())
    assert [name for name, _ in calls] == ["__float__"]
