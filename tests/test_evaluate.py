"""Evaluation CLI: multi-view supervised scores against a hand loop, zero-shot over three splits, unreadable
videos excluded and named, and checkpoints that must say what they cannot load."""
import json
import logging
import os
import statistics

import pytest
import torch

from m2clip_fast.data import VideoClipDataset, read_list_file
from m2clip_fast.data.synthetic import write_broken_video
from m2clip_fast.checkpoint import load_model_checkpoint
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.train import main as train_main
from ucf_layout import CAMEL, ucf_videos, write_class_ind

SMALL = ["--set", "num_frames=4", "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1"]


def train_args(dataset, out, *extra):
    return ["--preset", "demo", "--train-list", str(dataset / "train.txt"), "--class-names",
            str(dataset / "classes.txt"), "--output-dir", str(out), "--batch-size", "4", "--workers", "0",
            "--no-progress", "--device", "cpu", "--epochs", "1", *SMALL, *extra]


@pytest.fixture(scope="module")
def checkpoint(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_main(train_args(synthetic_dataset, out)) == 0
    return out / "checkpoints" / "last.pt"


def run_json(capsys, *args):
    assert evaluate_main([*args, "--workers", "0", "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_multi_view_scores_match_a_hand_loop(synthetic_dataset, checkpoint, capsys):
    evaluate_main(["--checkpoint", str(checkpoint), "--val-list", str(synthetic_dataset / "val.txt"),
                   "--views", "2x3", "--workers", "0", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    model, _ = load_model_checkpoint(checkpoint)
    model.eval()
    samples = read_list_file(synthetic_dataset / "val.txt")
    size = model.image_size
    data = VideoClipDataset(samples, num_frames=4, stride=1, train=False, size=size, num_clips=2, num_crops=3)
    correct = {"vc": 0, "text": 0, "fused": 0}
    for i in range(len(data)):
        item = data[i]
        assert item["video"].shape == (6, 4, 3, size, size)
        probs = model.predict(item["video"])
        for head in correct:
            correct[head] += int(probs[head].mean(dim=0).argmax()) == item["label"]
    assert result["num_samples"] == len(samples)
    for head, hits in correct.items():
        assert result[f"top1_{head}"] == pytest.approx(100.0 * hits / len(samples)), head
        assert result[f"top5_{head}"] >= result[f"top1_{head}"]


def test_views_default_to_the_checkpoints_own(synthetic_dataset, checkpoint, tmp_path, capsys):
    """Without --views a checkpoint is scored with the test views its configuration names (the k400 preset's
    official 3x4), exactly as with those views given; --views still overrides them."""
    from m2clip_fast.checkpoint import atomic_save, build_checkpoint

    model, _ = load_model_checkpoint(checkpoint)
    model.config.train["views"] = "2x3"
    own_views = tmp_path / "views_2x3.pt"
    atomic_save(build_checkpoint(model, None), own_views)
    val = ["--val-list", str(synthetic_dataset / "val.txt")]
    default = run_json(capsys, "--checkpoint", str(own_views), *val)
    given = run_json(capsys, "--checkpoint", str(checkpoint), *val, "--views", "2x3")
    assert default["views"] == "2x3" and default["top1_fused"] == given["top1_fused"]
    assert run_json(capsys, "--checkpoint", str(own_views), *val, "--views", "1x1")["views"] == "1x1"


def test_zero_shot_over_three_splits(synthetic_dataset, checkpoint, tmp_path, capsys):
    """A UCF101-style split folder over the synthetic videos, with CamelCase class names."""
    root = tmp_path / "videos"
    lines = {1: [], 2: [], 3: []}
    for n, (rel, _) in enumerate(ucf_videos(synthetic_dataset, root)):
        lines[n % 3 + 1].append(rel)
    splits = tmp_path / "splits"
    write_class_ind(splits)
    for split, entries in lines.items():
        (splits / f"testlist0{split}.txt").write_text("\n".join(entries) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CAMEL) + "\n")
    evaluate_main(["--checkpoint", str(checkpoint), "--zero-shot", "ucf101", "--split-dir", str(splits),
                   "--data-root", str(root), "--class-names", str(names), "--workers", "0", "--device", "cpu",
                   "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [s["split"] for s in result["splits"]] == [1, 2, 3]
    assert [s["num_samples"] for s in result["splits"]] == [len(lines[k]) for k in (1, 2, 3)]
    top1 = [s["top1"] for s in result["splits"]]
    assert result["top1_mean"] == pytest.approx(statistics.fmean(top1))
    assert result["top1_std"] == pytest.approx(statistics.pstdev(top1))


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ValueError, match="not an m2clip-fast checkpoint"):
        load_model_checkpoint(bad)


def test_unreadable_videos_are_excluded_and_named(synthetic_dataset, checkpoint, tmp_path, capsys):
    """Two broken videos in the list: the accuracy is that of the 8 good ones, and the output says so."""
    lines = [f"{synthetic_dataset / rel} {label}" for rel, label in
             (line.rsplit(None, 1) for line in (synthetic_dataset / "val.txt").read_text().splitlines())]
    for kind in ("garbage", "empty"):
        write_broken_video(tmp_path / f"{kind}.mp4", kind)
        lines.insert(3, f"{tmp_path / kind}.mp4 1")
    broken = tmp_path / "val_broken.txt"
    broken.write_text("\n".join(lines) + "\n")
    common = ["--checkpoint", str(checkpoint)]
    good = run_json(capsys, *common, "--val-list", str(synthetic_dataset / "val.txt"))
    result = run_json(capsys, *common, "--val-list", str(broken))
    assert (result["num_samples"], result["excluded"], result["dropped"]) == (8, 2, 0)
    assert [(os.path.basename(s["path"]), bool(s["reason"])) for s in result["skipped"]] == [
        ("empty.mp4", True), ("garbage.mp4", True)]
    for head in ("vc", "text", "fused"):
        assert result[f"top1_{head}"] == good[f"top1_{head}"]
    assert evaluate_main([*common, "--val-list", str(broken), "--workers", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "2 unreadable videos excluded; accuracy over 8 of 10 videos" in text
    assert f"{tmp_path / 'garbage.mp4'}: " in text and "replaced" not in text


def test_local_backbone_file_is_stored_absolute(synthetic_dataset, tmp_path, monkeypatch, capsys):
    """A relative --pretrained file is stored as an absolute path and its size: the checkpoint evaluates from
    another directory, a moved file is named with a hint, a replaced one is warned about."""
    from m2clip_fast.model import load_clip

    weights = tmp_path / "w" / "backbone.pt"
    weights.parent.mkdir()
    torch.save(load_clip("m2clip-demo", None, True).state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    assert train_main(train_args(synthetic_dataset, "run", "--max-steps", "1", "--pretrained", "w/backbone.pt")) == 0
    ckpt = torch.load("run/checkpoints/last.pt", weights_only=False)
    assert ckpt["pretrained"] == str(weights) and ckpt["pretrained_size"] == weights.stat().st_size
    assert "clip.visual.conv1.weight" not in ckpt["model"]  # the backbone comes from the file
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    common = ["--checkpoint", "../run/checkpoints/last.pt", "--val-list", str(synthetic_dataset / "val.txt")]
    first = run_json(capsys, *common)

    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    assert evaluate_main(common + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint's backbone weights file {weights} was not found; pass --pretrained" in err
    assert run_json(capsys, *common, "--pretrained", str(moved))["top1_fused"] == first["top1_fused"]

    state = torch.load(moved, weights_only=True)  # the same tensors in another serialisation: another size
    torch.save(state, weights, _use_new_zipfile_serialization=False)
    assert weights.stat().st_size != ckpt["pretrained_size"]
    assert evaluate_main(common + ["--workers", "0", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["top1_fused"] == first["top1_fused"]
    assert f"backbone weights file {weights} is {weights.stat().st_size} bytes" in captured.err


def test_random_backbone_checkpoint_needs_every_weight(checkpoint, tmp_path, caplog):
    """A checkpoint of a random backbone holds the whole model: loading it says nothing about random weights,
    and a missing backbone tensor is an error, not a silent re-initialisation."""
    with caplog.at_level(logging.WARNING):
        model, ckpt = load_model_checkpoint(checkpoint)
    assert ckpt["pretrained"] is None
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert torch.equal(model.state_dict()["clip.visual.conv1.weight"], ckpt["model"]["clip.visual.conv1.weight"])
    ckpt["model"].pop("clip.visual.conv1.weight")
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match=r"1 missing weights \['clip.visual.conv1.weight'\]"):
        load_model_checkpoint(tmp_path / "tampered.pt")


@pytest.mark.parametrize("option, value, message", [
    ("--views", "2x2", "1, 3 or 4 crops"), ("--views", "two", "CLIPSxCROPS"),
    ("--splits", "1,x", "split numbers like 1,2,3"), ("--splits", "1,4", "1, 2 and/or 3"),
    ("--batch-size", "0", "must be >= 1, got 0"),
])
def test_options_are_checked_before_anything_runs(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", "missing.pt", "--val-list", "v.txt", option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_zero_shot_split_files_are_checked_first(synthetic_dataset, tmp_path, capsys):
    """Every asked split is read before the model is built: a missing split 3 is reported first (here the
    checkpoint doesn't even exist, so an evaluation of split 1 could not start)."""
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "classInd.txt").write_text("1 A\n2 B\n")
    for split in (1, 2):
        (split_dir / f"testlist0{split}.txt").write_text("A/v_A_g01_c01.avi\n")
    (tmp_path / "videos" / "A").mkdir(parents=True)
    (tmp_path / "videos" / "A" / "v_A_g01_c01.avi").write_bytes(b"x")
    names = tmp_path / "names.txt"
    names.write_text("A\nB\n")
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.pt"), "--zero-shot", "ucf101", "--split-dir",
                          str(split_dir), "--data-root", str(tmp_path / "videos"), "--class-names", str(names)]) == 2
    assert "testlist03.txt" in capsys.readouterr().err
