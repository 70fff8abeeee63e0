"""The shared CLI plumbing: one-line user errors with exit code 2, and checkpoint files that explain
what is wrong with them."""
import argparse

import pytest
import torch

from m2clip_fast.checkpoint import CheckpointError, load_checkpoint_file
from m2clip_fast.cli import run_main
from m2clip_fast.data.datasets import DatasetError


def test_user_errors_are_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("M2CLIP_DEBUG", raising=False)

    def bad():
        raise DatasetError("training list x.txt: 3 problem(s)")

    assert run_main(bad, "m2clip-train") == 2
    err = capsys.readouterr().err
    assert err.startswith("m2clip-train: error: training list x.txt: 3 problem(s)")
    assert "Traceback" not in err


def test_debug_env_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("M2CLIP_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):
        run_main(lambda: (_ for _ in ()).throw(ValueError("boom")), "prog")


def test_bugs_are_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 // 0, "prog")


def test_interrupt_exits_130_with_hint(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_main(interrupted, "prog", on_interrupt=lambda: "resume with --resume") == 130
    assert "prog: interrupted; resume with --resume" in capsys.readouterr().err


def test_checkpoint_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": argparse.Namespace(lr=1.0)}, good)
    loaded = load_checkpoint_file(good)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["args"].lr == 1.0

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("ApplyEyeMakeup 1\n")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name, message in [("missing.pt", "does not exist"), ("empty.pt", "empty"),
                          ("text.pt", "not a readable PyTorch checkpoint"),
                          ("cut.pt", "not a readable PyTorch checkpoint")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint_file(tmp_path / name)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint_file(tmp_path)


def test_only_our_user_errors_are_one_line(capsys, monkeypatch):
    """A ValueError from inside torch (a shape bug) keeps its traceback; each of our user-facing error types
    prints its one line (a ConfigError's unquoted, though it is a KeyError)."""
    from m2clip_fast.data.errors import VideoDecodeError
    from m2clip_fast.errors import MissingFileError, UsageError
    from m2clip_fast.presets import ConfigError
    from m2clip_fast.run_dir import RunDirError

    monkeypatch.delenv("M2CLIP_DEBUG", raising=False)

    def shape_bug():
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(5, dtype=torch.long))

    with pytest.raises(ValueError, match="batch_size"):
        run_main(shape_bug, "prog")
    for error in (CheckpointError("c.pt is empty"), ConfigError("unknown config key 'x'"),
                  VideoDecodeError("v.mp4", "zero frames"), RunDirError("run holds a run"),
                  MissingFileError("f.yaml not found"), UsageError("--views 0x1"),
                  DatasetError("list.txt: 1 problem(s)")):
        def fail():
            raise error
        assert run_main(fail, "prog") == 2, error
        err = capsys.readouterr().err
        assert err == f"prog: error: {error.args[0]}\n" \
                      "(set M2CLIP_DEBUG=1 for the traceback)\n"
