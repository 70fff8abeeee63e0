"""predict: its probabilities against model.predict on frames decoded and sampled here by hand, zero-shot class
lists, input collection, unreadable files and exit codes."""
import csv
import json

import pytest
import torch

from clip_views import hand_views
from m2clip_fast.data import read_list_file
from m2clip_fast.data.synthetic import write_broken_video
from m2clip_fast.inputs import collect_videos
from m2clip_fast.predict import main as predict_main
from m2clip_fast.text import ZERO_SHOT_TEMPLATES

FAST = ["--workers", "0", "--device", "cpu", "--no-progress"]


def scores(rows, head):
    return {row["file"]: {p["label"]: p["score"] for p in row["predictions"][head]} for row in rows}


def test_probabilities_equal_model_predict_on_the_same_frames(synthetic_dataset, demo_checkpoint, demo_model, tmp_path):
    paths = [p for p, _ in read_list_file(synthetic_dataset / "val.txt")][:3]
    out = tmp_path / "p.json"
    assert predict_main([*paths, "--checkpoint", str(demo_checkpoint), "--views", "2x3", "--top-k", "8",
                         "--batch-size", "2", "--json", str(out), *FAST]) == 0
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == paths
    for path in paths:
        expected = demo_model.predict(hand_views(path, 2, 3, demo_model.image_size))
        for head in ("vc", "text", "fused"):
            got = scores(rows, head)[path]
            assert list(got) == [demo_model.class_names[i] for i in expected[head].mean(0).argsort(descending=True)]
            for label, score in got.items():
                want = float(expected[head].mean(0)[demo_model.class_names.index(label)])
                assert score == pytest.approx(want, abs=1e-5), (path, head, label)


def test_zero_shot_classes_use_the_prompt_ensemble(synthetic_dataset, demo_checkpoint, demo_model, tmp_path, capsys):
    path = read_list_file(synthetic_dataset / "val.txt")[0][0]
    classes = ["jumping", "a spinning bar", "waving"]
    assert predict_main([path, "--checkpoint", str(demo_checkpoint), "--classes", ",".join(classes),
                         "--csv", "-", *FAST]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert {r["head"] for r in rows} == {"text"} and [int(r["rank"]) for r in rows] == [1, 2, 3]
    expected = demo_model.predict(hand_views(path, 1, 1, demo_model.image_size), class_names=classes,
                             templates=ZERO_SHOT_TEMPLATES)["text"][0]
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(expected[classes.index(r["label"])]), abs=1e-5)


def test_unreadable_files_are_reported_and_skipped(synthetic_dataset, demo_checkpoint, tmp_path, capsys):
    good = read_list_file(synthetic_dataset / "val.txt")[0][0]
    bad = write_broken_video(tmp_path / "bad.mp4", "truncated")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video")
    assert predict_main([good, str(bad), str(junk), "--checkpoint", str(demo_checkpoint), *FAST]) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}:" in captured.err and f"skipped {junk}:" in captured.err
    assert good in captured.out and str(bad) not in captured.out
    assert "1 of 3 videos predicted, 2 skipped" in captured.err
    assert predict_main([str(junk), "--checkpoint", str(demo_checkpoint), *FAST]) == 1
    assert predict_main([str(tmp_path / "nothing_here"), "--checkpoint", str(demo_checkpoint), *FAST]) == 2
    assert "holds no video files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        predict_main([good, "--checkpoint", str(demo_checkpoint), "--window", "1", "--stride", "2"])
    assert usage.value.code == 2


def test_inputs_from_folders_globs_and_lists(synthetic_dataset, tmp_path):
    videos = synthetic_dataset / "videos"
    every = sorted(str(p) for p in videos.rglob("*.mp4"))
    assert collect_videos([str(videos)]) == every
    assert collect_videos([str(videos / "*" / "val_*.mp4")]) == [p for p in every if "/val_" in p]
    listing = tmp_path / "mine.txt"
    listing.write_text(f"# two videos\n{every[1]}\n{every[0]} 3\n")
    assert collect_videos([f"@{listing}", every[1], str(videos)]) == [every[1], every[0]] + every[2:]
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        collect_videos([str(tmp_path / "empty_dir")])


def test_a_preset_predicts_zero_shot_with_its_text_head(synthetic_dataset, tmp_path):
    """--preset builds the untrained model over --classes: only the text head, as create_model with the same seed."""
    from m2clip_fast.model import create_model

    path = read_list_file(synthetic_dataset / "val.txt")[0][0]
    classes = ["jumping", "waving"]
    torch.manual_seed(5)
    assert predict_main([path, "--preset", "demo", "--classes", ",".join(classes), "--json",
                         str(tmp_path / "p.json"), *FAST]) == 0
    (row,) = json.loads((tmp_path / "p.json").read_text())
    assert list(row["predictions"]) == ["text"]
    torch.manual_seed(5)
    fresh = create_model("demo", pretrained=None, class_names=classes).eval()
    fresh_views = hand_views(path, 1, 1, fresh.image_size, frames=fresh.num_frames, stride=4)  # the preset's
    expected = fresh.predict(fresh_views, class_names=classes, templates=ZERO_SHOT_TEMPLATES)["text"][0]
    for p in row["predictions"]["text"]:
        assert p["score"] == pytest.approx(float(expected[classes.index(p["label"])]), abs=1e-5)
