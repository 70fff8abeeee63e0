"""evaluate --report: the confusion matrix and per-class accuracy against hand counts, and the report of a real
evaluation against model.predict on hand-decoded views and against evaluate's own printed accuracy."""
import csv
import json

import numpy as np
import pytest
import torch

from m2clip_fast.data import read_list_file
from m2clip_fast.data.synthetic import write_broken_video
from m2clip_fast.evaluate import main as evaluate_main
from m2clip_fast.report import confusion_matrix, most_confused, per_class_rows
from clip_views import hand_views


def test_confusion_matrix_is_a_hand_count():
    labels = [0, 0, 1, 2, 2, 2, 3]
    predicted = [0, 1, 1, 0, 2, 1, 1]
    # true 0: one right, one as 1; true 1: right; true 2: as 0, right, as 1; true 3: as 1
    expected = np.array([[1, 1, 0, 0],
                         [0, 1, 0, 0],
                         [1, 1, 1, 0],
                         [0, 1, 0, 0]])
    matrix = confusion_matrix(labels, predicted, 4)
    assert matrix.tolist() == expected.tolist()
    assert most_confused(matrix) == [(0, 1, 1), (2, 0, 1), (2, 1, 1), (3, 1, 1)]  # equal counts: class order
    assert most_confused(matrix, 2) == [(0, 1, 1), (2, 0, 1)]


def test_per_class_accuracy_is_a_hand_count():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 0, 2, 1])
    rows = per_class_rows({"fused": probs}, labels, ["a", "b", "c"])
    # class 0: video 0 right, video 1 wrong -> 50%; class 1: video 3 ranks it second -> 0%; class 2: right
    assert [(r["videos"], r["top1_fused"]) for r in rows] == [(2, "50.00"), (1, "0.00"), (1, "100.00")]
    assert [r["top5_fused"] for r in rows] == ["100.00", "100.00", "100.00"]  # 3 classes: top-5 is everything
    assert per_class_rows({"vc": probs[:1]}, labels[:1], ["a", "b", "c"])[1]["top1_vc"] == ""  # no videos


def test_report_of_a_real_evaluation(synthetic_dataset, demo_checkpoint, demo_model, tmp_path, capsys):
    bad = write_broken_video(tmp_path / "bad.mp4", "truncated")
    samples = read_list_file(synthetic_dataset / "val.txt")
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{p} {label}\n" for p, label in samples) + f"{bad} 3\n")
    common = ["--checkpoint", str(demo_checkpoint), "--val-list", str(listing), "--workers", "0", "--device", "cpu",
              "--json"]
    assert evaluate_main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    out = tmp_path / "report"
    assert evaluate_main([*common, "--report", str(out)]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported == plain  # the same accuracy, whether a report is written or not

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [p for p, _ in samples]  # the unreadable video has no prediction
    names = demo_model.class_names
    predicted = []
    for r, (path, label) in zip(records, samples):
        expected = demo_model.predict(hand_views(path, 1, 1, demo_model.image_size))
        assert r["label"] == label and r["label_name"] == names[label]
        for head in ("fused", "vc", "text"):
            top = r["predictions"][head][0]
            assert top["label"] == names[int(expected[head][0].argmax())]
            assert top["score"] == pytest.approx(float(expected[head][0].max()), abs=1e-5)
        predicted.append(int(expected["fused"][0].argmax()))
        assert r["correct"] == (predicted[-1] == label)

    with open(out / "confusion.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == names and [row[0] for row in table[1:]] == names
    counts = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    hand = np.zeros((len(names), len(names)), int)
    for (_, label), p in zip(samples, predicted):
        hand[label, p] += 1
    assert counts.tolist() == hand.tolist()
    with open(out / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    for c, row in enumerate(per_class):
        videos = [p for (_, label), p in zip(samples, predicted) if label == c]
        assert int(row["videos"]) == len(videos)
        assert float(row["top1_fused"]) == pytest.approx(100.0 * sum(p == c for p in videos) / len(videos))
    assert np.mean([r["correct"] for r in records]) * 100 == pytest.approx(plain["top1_fused"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_zero_shot_writes_one_report_per_split(synthetic_dataset, demo_checkpoint, tmp_path, capsys):
    from ucf_layout import CAMEL, ucf_videos, write_class_ind

    root, splits = tmp_path / "videos", tmp_path / "splits"
    videos = [rel for rel, _ in ucf_videos(synthetic_dataset, root)]
    write_class_ind(splits)
    for split in (1, 2):
        (splits / f"testlist0{split}.txt").write_text("\n".join(videos[split - 1::2]) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CAMEL) + "\n")
    out = tmp_path / "report"
    assert evaluate_main(["--checkpoint", str(demo_checkpoint), "--zero-shot", "ucf101", "--split-dir", str(splits),
                          "--splits", "1,2", "--data-root", str(root), "--class-names", str(names), "--workers",
                          "0", "--device", "cpu", "--json", "--report", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    for split in result["splits"]:
        records = [json.loads(line) for line in (out / f"split_{split['split']}" / "predictions.jsonl").open()]
        assert len(records) == split["num_samples"] == len(videos[split["split"] - 1::2])
        assert {r["label_name"] for r in records} <= set(CAMEL) and all(list(r["predictions"]) == ["text"]
                                                                         for r in records)
        assert 100 * np.mean([r["correct"] for r in records]) == pytest.approx(split["top1"])
