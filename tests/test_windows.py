"""Long videos (predict --window): windows that cover the video exactly, their JSONL rows against model.predict
on hand-sampled frames, the timeline PNG and the annotated copy."""
import json

import numpy as np
import pytest

from m2clip_fast.data import decode_all_frames
from m2clip_fast.data.synthetic import render_clip, write_video
from m2clip_fast.predict import main as predict_main
from m2clip_fast.windows import frame_windows, plan_windows
from clip_views import hand_views
from test_predict import FAST



@pytest.mark.parametrize("total, window, stride", [(96, 24, 8), (100, 24, 8), (96, 24, 24), (10, 24, 8),
                                                   (1, 24, 8), (25, 24, 24), (7, 1, 1)])
def test_windows_cover_the_video_exactly(total, window, stride):
    windows = plan_windows(total, window, stride)
    assert windows[0][0] == 0 and windows[-1][1] == total
    assert all(e - s == min(window, total) for s, e in windows)
    covered = np.zeros(total, bool)
    for (s, e), nxt in zip(windows, windows[1:] + [None]):
        covered[s:e] = True
        if nxt is not None:
            assert 0 < nxt[0] - s <= stride  # in order, no frame skipped between two windows
    assert covered.all()
    assert len(set(windows)) == len(windows)


def test_windows_reject_gaps_and_empty_videos():
    with pytest.raises(ValueError):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError):
        plan_windows(0, 4, 2)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """48 frames at 16 fps (3 s): a bar moving left, then one moving right."""
    rng = np.random.default_rng(0)
    frames = np.concatenate([render_clip(label, rng, frames=24, size=32) for label in (0, 1)])
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames, fps=16)


def test_window_predictions_timeline_and_annotated_copy(long_video, demo_checkpoint, demo_model, tmp_path):
    out_dir, annotated = tmp_path / "pred", tmp_path / "annotated.mp4"
    assert predict_main([str(long_video), "--checkpoint", str(demo_checkpoint), "--window", "1", "--stride",
                         "0.75", "--out-dir", str(out_dir), "--annotate", str(annotated), "--top-k", "8",
                         *FAST]) == 0
    rows = [json.loads(line) for line in (out_dir / "long.windows.jsonl").read_text().splitlines()]
    # 16-frame windows every 12 frames over 48 frames: 0, 12, 24, and the last one ending at frame 48
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 16), (12, 28), (24, 40), (32, 48)]
    assert rows[0]["start"] == 0.0 and rows[-1]["end"] == pytest.approx(3.0)
    for r in rows:
        expected = demo_model.predict(hand_views(str(long_video), 1, 1, demo_model.image_size, r["start_frame"],
                                            r["end_frame"]))["fused"][0]
        for p in r["predictions"]["fused"]:
            assert p["score"] == pytest.approx(float(expected[demo_model.class_names.index(p["label"])]), abs=1e-5)
    assert (out_dir / "long.timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    source, copy = decode_all_frames(long_video), decode_all_frames(annotated)
    assert copy.shape == source.shape
    # the label box is black behind white text in the top-left corner (at 32 px the text is 6 px high, and H.264
    # blurs its strokes to grey); the rest of the frame is the video
    corner, before = copy[:, :6, :24].float(), source[:, :6, :24].float()
    assert (corner < 40).float().mean() > 0.4 > (before < 40).float().mean()

    def grey_strokes(region):  # per frame: pixels bright and colourless, as the label's strokes are
        return ((region.amin(-1) > 90) & (region.amax(-1) - region.amin(-1) < 40)).flatten(1).sum(1)
    assert (grey_strokes(corner) > 4 * grey_strokes(before).clamp(min=1)).all()  # the bar passes the corner too
    assert (copy[:, 16:].float() - source[:, 16:].float()).abs().mean() < 6


def test_window_longer_than_the_video_and_a_one_frame_video(demo_checkpoint, demo_model, tmp_path):
    one = write_video(tmp_path / "one.mp4", render_clip(2, np.random.default_rng(1), frames=1, size=32), fps=10)
    assert predict_main([str(one), "--checkpoint", str(demo_checkpoint), "--window", "5", "--out-dir",
                         str(tmp_path), "--json", str(tmp_path / "w.json"), *FAST]) == 0
    (row,) = json.loads((tmp_path / "w.json").read_text())
    assert (row["start_frame"], row["end_frame"], row["start"], row["end"]) == (0, 1, 0.0, pytest.approx(0.1))
    expected = demo_model.predict(hand_views(str(one), 1, 1, demo_model.image_size))["vc"][0]
    top = row["predictions"]["vc"][0]
    assert top["score"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_each_frame_shows_the_nearest_window():
    rows = [{"start_frame": 0, "end_frame": 16}, {"start_frame": 12, "end_frame": 28}]
    current = frame_windows(28, rows)
    assert current.tolist() == [0] * 14 + [1] * 14  # centres 8 and 20: frame 13.5 is nearer 8 (5.5 < 6.5)
