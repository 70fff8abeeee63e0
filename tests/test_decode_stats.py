"""Decode-path counts travel from DataLoader workers to train's metrics.jsonl and evaluate's result."""
import json

import numpy as np
import torch

from m2clip_fast.data import DecodeTally, VideoClipDataset, build_loader, decode_all_frames
from m2clip_fast.data.decode import clear_index_cache
from m2clip_fast.data.sampling import sample_indices
from m2clip_fast.data.synthetic import textured_frames
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.train import main as train_main
from video_formats import write_packed_mpeg4_avi

SMALL = ["--set", "num_frames=4", "ted_bottleneck=8", "text_bottleneck=8", "train.stride=1",
         "train.warmup_epochs=0.5"]


def _mixed_list(synthetic_dataset, tmp_path, packed=4, plain=4):
    """A list of ``packed`` XviD AVIs with packed B-frames (decoded through) and ``plain`` H.264 mp4s."""
    lines = []
    for i in range(packed):
        path = write_packed_mpeg4_avi(tmp_path / f"xvid_{i}.avi", textured_frames(12, 32, 32, seed=i), gop=6)
        lines.append(f"{path} {i}")
    lines += (synthetic_dataset / "train.txt").read_text().splitlines()[:plain]
    listing = tmp_path / "mixed.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, [str(tmp_path / f"xvid_{i}.avi") for i in range(packed)]


def test_loader_workers_report_each_clips_decode_path(synthetic_dataset, tmp_path):
    listing, packed = _mixed_list(synthetic_dataset, tmp_path, packed=3, plain=5)
    samples = [(p if p.startswith("/") else str(synthetic_dataset / p), int(label))
               for p, label in (line.rsplit(None, 1) for line in listing.read_text().splitlines())]
    dataset = VideoClipDataset(samples, num_frames=4, stride=2, train=False, size=32)
    tally = DecodeTally()
    for batch in tally.watch(build_loader(dataset, batch_size=3, workers=2, shuffle=False)):
        assert [d["fallback"] for d in batch["decoded"]] == [d["path"] in packed for d in batch["decoded"]]
    record = tally.record()
    assert record == {"clips_decoded": 8, "fallback_decodes": 3, "files_needing_fallback": 3,
                      "fallback_examples": sorted(packed)}


def test_a_fallback_clip_is_the_same_cold_or_warm(tmp_path):
    """Sampling depends on the frame count only: a file whose count is first learnt by decoding it gives the
    same clip as when it is known, and the frames of the plain decode at the sampled indices."""
    path = write_packed_mpeg4_avi(tmp_path / "x.avi", textured_frames(30, 32, 32, seed=5), gop=10)
    dataset = VideoClipDataset([(str(path), 0)], num_frames=4, stride=3, train=True, size=32, flip=False)
    clear_index_cache()
    cold = dataset[0]
    warm = dataset[0]
    # decoded through the first time, which learns the file; the second seeks in the learned order
    assert cold["decoded"] == {"path": str(path), "fallback": True}
    assert warm["decoded"] == {"path": str(path), "fallback": False}
    assert torch.equal(cold["video"], warm["video"])
    clear_index_cache()
    frames, fallback = dataset._frames(str(path), np.random.default_rng([0, 0, 0, 0]), 1)
    expected = sample_indices("dense", 30, 4, train=True, stride=3, num_clips=1,
                              rng=np.random.default_rng([0, 0, 0, 0])).reshape(-1)
    assert fallback and torch.equal(frames, decode_all_frames(path, expected))


def test_train_and_evaluate_report_decode_stats(synthetic_dataset, tmp_path, capsys):
    listing, packed = _mixed_list(synthetic_dataset, tmp_path)
    run = tmp_path / "run"
    args = ["--preset", "demo", "--train-list", str(listing), "--class-names", str(synthetic_dataset / "classes.txt"),
            "--data-root", str(synthetic_dataset), "--output-dir", str(run), "--batch-size", "4", "--workers", "1",
            "--no-progress", "--device", "cpu", "--epochs", "1", *SMALL]
    assert train_main(args) == 0
    assert "4 of 8 clips decoded through from the start (4 file(s) cannot be seeked exactly" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record == {"epoch": 0, "step": 2, "decode_stats": {
        "decoder": "pyav", "clips_decoded": 8, "fallback_decodes": 4, "files_needing_fallback": 4, "fallback_examples": sorted(packed)}}

    common = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--val-list", str(listing),
              "--data-root", str(synthetic_dataset), "--device", "cpu"]
    assert evaluate_main(common + ["--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode_stats"]["clips_decoded"] == 8 and result["decode_stats"]["fallback_decodes"] == 4
    assert result["decode_stats"]["decoder"] == "pyav"
    assert result["num_samples"] == 8
    # in this process: the first evaluation decodes the packed files through and says so; that learns them, so
    # the second one seeks in their learned order
    assert evaluate_main(common + ["--workers", "0"]) == 0
    assert "4 of 8 clips decoded through from the start (4 file(s) cannot be seeked exactly" in capsys.readouterr().out
    assert evaluate_main(common + ["--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "8 videos, 1x1 views" in printed and "decoded through" not in printed
