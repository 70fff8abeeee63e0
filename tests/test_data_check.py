"""python -m m2clip_fast.data.check on real files: good, packed XviD, broken, missing; resume; list formats."""
import json

import pytest

from m2clip_fast.data import check
from m2clip_fast.data import decode as decode_module
from m2clip_fast.data.decode import clear_index_cache
from m2clip_fast.data.synthetic import textured_frames, write_broken_video, write_video
from m2clip_fast.data.torchcodec_backend import torchcodec_available
from video_formats import write_encoded, write_mpeg4_avi_with_dropped_frames, write_packed_mpeg4_avi


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    frames = textured_frames(40, 32, 48, seed=2)
    made = {
        "good.mp4": write_video(root / "good.mp4", frames, codec="h264", gop=10),
        "good.avi": write_video(root / "good.avi", frames, codec="mpeg4", gop=8),
        "xvid.avi": write_packed_mpeg4_avi(root / "xvid.avi", frames, gop=12),
        "truncated.mp4": write_broken_video(root / "truncated.mp4", "truncated"),
        "garbage.mp4": write_broken_video(root / "garbage.mp4", "garbage"),
    }
    listing = root / "list.txt"
    listing.write_text("".join(f"{name} {i}\n" for i, name in enumerate([*made, "missing.mp4"])))
    return root, listing


def _report(path):
    return {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line) for line in path.read_text().splitlines()}


def test_scan_reports_every_video(videos, tmp_path, capsys):
    root, listing = videos
    out = tmp_path / "report.jsonl"
    assert check.main([str(listing), "--out", str(out), "--workers", "0", "--windows", "3"]) == 0
    report = _report(out)
    assert set(report) == {"good.mp4", "good.avi", "xvid.avi", "truncated.mp4", "garbage.mp4", "missing.mp4"}
    good = report["good.mp4"]
    assert (good["readable"], good["decode"], good["codec"], good["frames"]) == (True, "sparse", "h264", 40)
    assert (good["width"], good["height"], good["fps"], good["duration"]) == (48, 32, 25.0, 1.6)
    assert good["keyframe_interval"] == {"min": 10, "mean": 10.0, "max": 10} and good["windows_checked"] == 3
    assert report["good.avi"]["decode"] == "sparse" and report["good.avi"]["keyframe_interval"]["max"] == 8
    xvid = report["xvid.avi"]
    assert (xvid["readable"], xvid["decode"], xvid["frames"], xvid["windows_checked"]) == (True, "learned", 40, 3)
    assert "packed B-frame" in xvid["fallback_reason"]
    assert not report["truncated.mp4"]["readable"] and "truncated" in report["truncated.mp4"]["reason"]
    assert "cannot open container" in report["garbage.mp4"]["reason"]
    assert report["missing.mp4"]["reason"] == "file not found"
    summary = capsys.readouterr().out
    assert ("6 videos: 3 readable, 3 unreadable; 2 seek exactly, 1 need the decode-through fallback (1 of them "
            "only once per process, then seek)") in summary
    assert "fallback, MPEG-4 placeholder (N-VOP) or packed B-frame packets: 1" in summary
    assert "unreadable" in summary and "slowest:" in summary

    # --fail-on-unreadable: 1 with unreadable videos, 0 without
    assert check.main([str(listing), "--workers", "0", "--windows", "1", "--fail-on-unreadable"]) == 1
    only_good = tmp_path / "good.txt"
    only_good.write_text(f"{root / 'good.mp4'} 0\n{root / 'xvid.avi'} 1\n")
    assert check.main([str(only_good), "--workers", "0", "--fail-on-unreadable"]) == 0


def test_resume_skips_videos_already_reported(videos, tmp_path, capsys):
    _, listing = videos
    out = tmp_path / "report.jsonl"
    assert check.main([str(listing), "--out", str(out), "--workers", "2", "--windows", "1"]) == 0
    first = out.read_text().splitlines()
    assert len(first) == 6
    # an interrupted run: the last entry torn mid-line
    out.write_text("\n".join(first[:4]) + "\n" + first[4][:25])
    capsys.readouterr()
    assert check.main([str(listing), "--out", str(out), "--workers", "0", "--windows", "1"]) == 0
    assert "(4 already in the report)" in capsys.readouterr().out
    again = out.read_text().splitlines()
    assert again[:4] == first[:4] and len(again) == 6  # the torn line dropped, two videos checked anew
    assert {json.loads(line)["path"] for line in again} == {json.loads(line)["path"] for line in first}
    assert check.main([str(listing), "--out", str(out), "--workers", "0"]) == 0
    assert out.read_text().splitlines() == again and "(6 already in the report)" in capsys.readouterr().out


def test_a_count_the_index_gets_wrong_is_reported(tmp_path, monkeypatch):
    """Files that cannot seek at once are 'learned' (seek after one decode through) or 'fallback' (raw streams,
    always decoded through). Were the index to take N-VOP 'dropped frame' packets for frames (57 packets, 50 frames), sparse frame
    numbers would be off: the check compares the count with a full decode's and says so."""
    path = write_mpeg4_avi_with_dropped_frames(tmp_path / "dropped.avi", textured_frames(50, 32, 32, seed=3))
    assert check.check_video(str(path))["decode"] == "learned"
    raw = write_encoded(tmp_path / "raw.h264", textured_frames(20, 32, 32), "libx264", fmt="h264")
    entry = check.check_video(str(raw))
    assert (entry["decode"], entry["fallback_reason"], entry["frames"]) == (
        "fallback", "a raw stream without container timestamps", 20)
    clear_index_cache()
    monkeypatch.setattr(decode_module, "_inexact_reason", lambda *args: "")
    entry = check.check_video(str(path), windows=2)
    assert entry["decode"] == "wrong" and entry["wrong_reason"] == "a full decode gives 50 frames, the index lists 57"
    clear_index_cache()


def test_list_formats_without_class_names(tmp_path):
    """Official split files, Kinetics CSVs and SSv2 JSONs are read without a class list; HMDB51 gives the
    training and the test videos of its split."""
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nArchery/v_b.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("Archery/v_c.avi\n")
    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "brush_hair_test_split1.txt").write_text("h1.avi 1\nh2.avi 2\nh0.avi 0\n")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,xyz,1,11,val\n")
    (tmp_path / "s.json").write_text(json.dumps([{"id": "77", "template": "Pushing [something]"}]))
    listed = check.list_videos([str(tmp_path / n) for n in ("trainlist01.txt", "testlist01.txt", "k.csv", "s.json")]
                               + [str(hmdb / "brush_hair_test_split1.txt"), str(tmp_path / "trainlist01.txt")],
                               data_root="/data")
    assert listed == ["/data/ApplyEyeMakeup/v_a.avi", "/data/Archery/v_b.avi", "/data/Archery/v_c.avi",
                      "/data/xyz_000001_000011.mp4", "/data/77.webm", "/data/brush_hair/h1.avi",
                      "/data/brush_hair/h2.avi"]
    (tmp_path / "classInd.txt").unlink()  # not needed to find the videos
    assert check.list_videos([str(tmp_path / "testlist01.txt")], data_root="/d") == ["/d/Archery/v_c.avi"]


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        check.main([])
    assert info.value.code == 2
    assert check.main([str(tmp_path / "nope.txt"), "--workers", "0"]) == 2
    assert "list file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert check.main([str(empty), "--workers", "0"]) == 2
    assert "no videos in" in capsys.readouterr().err


@pytest.mark.skipif(not torchcodec_available(), reason="torchcodec (with FFmpeg libraries) is not installed")
def test_torchcodec_option_reports_how_that_decoder_serves_each_video(videos, tmp_path, capsys):
    root, listing = videos
    out = tmp_path / "report.jsonl"
    assert check.main([str(listing), "--out", str(out), "--workers", "0", "--windows", "2", "--torchcodec"]) == 0
    report = _report(out)
    assert report["good.mp4"]["torchcodec"] == report["good.avi"]["torchcodec"] == "served"
    xvid = report["xvid.avi"]
    assert xvid["torchcodec"] == "pyav" and xvid["torchcodec_reason"].startswith("frames decoded by PyAV's rules")
    assert "torchcodec" not in report["garbage.mp4"]
    assert "--decoder torchcodec: 2 decoded by torchcodec, 1 by PyAV" in capsys.readouterr().out
