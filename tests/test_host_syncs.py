"""A training step must not wait for the device: no tensor → Python conversion inside forward/backward, nor
in the trainer's step around it (loss bookkeeping, optimizer, schedule) except at its log points.

On CUDA each ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)`` or ``.cpu()`` blocks the host
until the GPU has caught up, which empties the launch queue every step. The step runs here on CPU, where
the same calls are visible: every such method of torch.Tensor is wrapped to record its caller, and the
tests assert that no call comes from the model's forward or backward, and that the trainer's only ones are the
log points' copies of the losses. Data loading is left out: it works on host tensors (in loader workers).
"""
import contextlib
import csv
import traceback

import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.train import LossWindow, Trainer, parse_args, start

FRAMES, SIZE = 4, 32
CLASSES = ["moving left", "moving right", "rotating clockwise", "rotating anticlockwise", "growing"]
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


LOADING = ("/m2clip_fast/data/", "/torch/utils/data/")  # the loader's sampler, collate and decoding


@contextlib.contextmanager
def host_conversions(skip_loading: bool = False):
    """Yields a list that collects (method, innermost m2clip_fast or caller frame) of every conversion; with
    ``skip_loading``, not those made while loading data (a frame of LOADING on the stack)."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            if skip_loading and any(part in f.filename for f in frames for part in LOADING):
                return original(self, *args, **kwargs)
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


@pytest.mark.parametrize("accum, log_every, log_points", [(1, 3, [3, 4]), (2, 1, [1, 2])],
                         ids=["every-3-steps", "accum-2"])
def test_trainer_syncs_only_at_log_points(synthetic_dataset, tmp_path, accum, log_every, log_points):
    """A whole epoch of the Trainer (16 clips, batch 4: 4 micro-batches, with grad clipping and the lr schedule):
    its only conversions are the loss window's copies to the host, one per log point (every ``log_every`` steps
    and at the epoch's end), and every step still gets its own row in train_log.csv."""
    d = synthetic_dataset
    args = parse_args(["--preset", "demo", "--train-list", str(d / "train.txt"), "--class-names",
                       str(d / "classes.txt"), "--output-dir", str(tmp_path / "run"), "--batch-size", "4",
                       "--workers", "0", "--no-progress", "--device", "cpu", "--set", "num_frames=4",
                       "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1", "train.grad_clip=1.0",
                       f"train.accum_steps={accum}", f"train.log_every={log_every}"])
    trainer = Trainer(start(args))
    trainer.prepare_output()
    logged = []
    rows = LossWindow.rows

    def noting_steps(window):  # which steps each log point wrote (the method itself runs unchanged)
        out = rows(window)
        logged.extend([r["step"] for r in out][-1:])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LossWindow, "rows", noting_steps)
        with host_conversions(skip_loading=True) as calls:
            assert trainer.train_epoch(0, 0) == (4, False)
    trainer.close()
    assert logged == log_points
    assert [name for name, _ in calls] == ["tolist"] * len(log_points), calls
    assert all("the window's one host sync" in where for _, where in calls), calls
    with open(tmp_path / "run" / "train_log.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == list(range(1, 4 // accum + 1))
    assert all(float(r["loss"]) > 0 for r in table)
