"""Evaluation CLI: multi-view supervised scores against a hand loop, and zero-shot over three splits."""
import json
import statistics

import pytest
import torch

from m2clip_fast.data import VideoClipDataset, read_list_file
from m2clip_fast.engine import load_model_checkpoint
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.train import main as train_main

SMALL = ["--set", "num_frames=4", "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1"]


@pytest.fixture(scope="module")
def checkpoint(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_main(["--preset", "demo", "--train-list", str(synthetic_dataset / "train.txt"), "--class-names",
                str(synthetic_dataset / "classes.txt"), "--output-dir", str(out), "--batch-size", "4",
                "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", "1", *SMALL])
    return out / "checkpoints" / "last.pt"


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


def test_zero_shot_over_three_splits(synthetic_dataset, checkpoint, tmp_path, capsys):
    """A UCF101-style split folder over the synthetic videos, with CamelCase class names."""
    camel = ["MovingLeft", "MovingRight", "MovingUp", "MovingDown", "RotatingClockwise", "RotatingAnticlockwise",
             "Growing", "Shrinking"]
    root = tmp_path / "videos"
    lines = {1: [], 2: [], 3: []}
    for n, line in enumerate((synthetic_dataset / "train.txt").read_text().splitlines()):
        rel, label = line.rsplit(None, 1)
        cls = camel[int(label)]
        (root / cls).mkdir(parents=True, exist_ok=True)
        target = root / cls / f"v_{cls}_g{n:02d}_c01.mp4"
        target.write_bytes((synthetic_dataset / rel).read_bytes())
        lines[n % 3 + 1].append(f"{cls}/{target.name}")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(camel)))
    for split, entries in lines.items():
        (splits / f"testlist0{split}.txt").write_text("\n".join(entries) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(camel) + "\n")
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
