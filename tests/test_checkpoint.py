"""Checkpoints load without running code from the file: ours hold only tensors and plain values
(weights_only=True), a file with any other pickled object is refused by every command that reads one,
naming the object, and only --trust-checkpoint unpickles in full."""
import random

import numpy as np
import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.checkpoint import (FORMAT_VERSION, UPGRADE_COMMAND, CheckpointError, TrainingState, atomic_save,
                                    build_checkpoint, main as checkpoint_main, read_checkpoint)
from m2clip_fast.convert import main as convert_main
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.runtime import rng_state, set_rng_state
from m2clip_fast.train import main as train_main

CLASSES = ["a", "b", "c"]


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # pickled as io.open


def _training_checkpoint():
    torch.manual_seed(0)
    model = create_model("tiny", class_names=CLASSES, fused=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, model.num_frames, 3, model.image_size, model.image_size), torch.tensor([0, 2]))["loss"].backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    state = TrainingState(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=0, batches_done=1,
                          epoch_done=False, step=1, rng=[rng_state()], best=-1.0, metrics={},
                          run={"preset": "tiny", "config_file": None, "settings": {}, "batches_per_epoch": 4})
    return build_checkpoint(model, None, state)


def test_our_checkpoints_load_weights_only_and_restore_the_rng_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state too
    ckpt = _training_checkpoint()
    atomic_save(ckpt, tmp_path / "last.pt")
    plain = torch.load(tmp_path / "last.pt", weights_only=True)  # no allow-list needed
    assert plain["format_version"] == FORMAT_VERSION
    expected = (random.random(), np.random.rand(4).tolist(), np.random.normal(), torch.rand(3))
    set_rng_state(read_checkpoint(tmp_path / "last.pt", training=True)["rng"][0])
    got = (random.random(), np.random.rand(4).tolist(), np.random.normal(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_pickle_payload_is_refused_by_every_command_and_never_runs(tmp_path, capsys, monkeypatch,
                                                                     synthetic_dataset):
    monkeypatch.delenv("M2CLIP_DEBUG", raising=False)
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "bad.pt"
    torch.save({**_training_checkpoint(), "extra": _Payload(marker)}, bad)

    def refused(exit_code):
        err = capsys.readouterr().err
        assert exit_code == 2 and f"{bad} needs io.open to load" in err and "--trust-checkpoint" in err
        assert len(err.strip().splitlines()) == 2  # the error line and the M2CLIP_DEBUG hint: no traceback
        assert not marker.exists()

    refused(evaluate_main(["--checkpoint", str(bad), "--val-list", str(tmp_path / "val.txt"), "--device", "cpu"]))
    # (train reads its lists before the checkpoint: a real one, so that the checkpoint is what it refuses)
    refused(train_main(["--preset", "tiny", "--train-list", str(synthetic_dataset / "train.txt"), "--device", "cpu",
                        "--output-dir", str(tmp_path / "run"), "--resume", str(bad)]))
    refused(convert_main([str(bad), "--preset", "tiny", "--pretrained", "none", "--out", str(tmp_path / "o.pt")]))
    assert not (tmp_path / "o.pt").exists()

    # the flag is the one way to unpickle in full (and then the payload runs: hence its warning)
    assert convert_main([str(bad), "--preset", "tiny", "--pretrained", "none", "--out", str(tmp_path / "o.pt"),
                         "--trust-checkpoint"]) == 2  # not an official checkpoint, but it was unpickled
    assert marker.exists()


def test_checkpoints_of_the_previous_version_are_refused_then_upgraded(tmp_path, capsys, monkeypatch):
    """The previous version pickled numpy's RNG state tuple (an ndarray): refused with the upgrade command,
    which (with --trust-checkpoint) rewrites it in the current format, the same state in tensors."""
    monkeypatch.delenv("M2CLIP_DEBUG", raising=False)
    old = _training_checkpoint()
    del old["format_version"]
    legacy = np.random.get_state()
    old["rng"][0]["numpy"] = legacy
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="numpy.*" + UPGRADE_COMMAND.replace(" ", r"\s")):
        read_checkpoint(tmp_path / "old.pt", training=True)

    assert checkpoint_main(["upgrade", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not (tmp_path / "new.pt").exists()
    assert checkpoint_main(["upgrade", str(tmp_path / "old.pt"), str(tmp_path / "new.pt"), "--trust-checkpoint"]) == 0
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert new["format_version"] == FORMAT_VERSION
    state = new["rng"][0]["numpy"]
    assert state["name"] == legacy[0] and np.array_equal(state["words"].numpy(), legacy[1].astype(np.int64))
    assert (state["pos"], state["has_gauss"], state["cached_gaussian"]) == legacy[2:]
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
