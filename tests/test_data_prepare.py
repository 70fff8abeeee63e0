"""python -m m2clip_fast.data.prepare on real files written here: frames kept one for one, resized and
re-encoded within a PSNR bound, keyframes every --keyint, the copies seek on the fast path, lists rewritten,
resumable after SIGKILL, shards merged, unreadable sources listed and left out."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from m2clip_fast.data.datasets import read_kinetics_csv, read_list_file
from m2clip_fast.data.decode import DecodeStats, decode_all_frames, decode_frames, get_index, iter_frames
from m2clip_fast.data.prepare import main, output_size

from video_formats import packets, write_encoded, write_packed_mpeg4_avi

ROOT = Path(__file__).resolve().parents[1]
SHORT = 48  # the copies' short side: 96x72 sources become 64x48
# measured on these sources at crf 23: the worst frame of each copy is at 31.0, 31.8 and 32.7 dB
MIN_PSNR_DB = 28.0


def moving_pattern(frames: int, height: int = 72, width: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): smooth gradients drifting by a few pixels per frame (motion the codec must code)."""
    y, x = np.mgrid[0:height, 0:width]
    phase = np.random.default_rng(seed).integers(0, 256, 3)
    return np.stack([np.stack([(x * 3 + t * 2 + phase[0]) % 256, (y * 3 + t + phase[1]) % 256,
                               ((x + y) * 2 + t * 3 + phase[2]) % 256], -1) for t in range(frames)]).astype(np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A data root with a long-GOP H.264 mp4, an XviD AVI with packed B-frames, a variable-rate H.264 mp4
    and a file that is no video, listed in an mmaction2 list (labels 0..3)."""
    root = tmp_path_factory.mktemp("src")
    (root / "a").mkdir()
    (root / "b").mkdir()
    write_encoded(root / "a" / "long_gop.mp4", moving_pattern(64, seed=1), "libx264", gop=250)
    write_packed_mpeg4_avi(root / "b" / "packed.avi", moving_pattern(64, seed=2))
    gaps = np.random.default_rng(3).integers(1, 4, 48)  # 1 to 3 ticks of 1/50 s between frames
    write_encoded(root / "b" / "vfr.mp4", moving_pattern(48, seed=3), "libx264", pts=np.cumsum(gaps) - gaps[0],
                  time_base=Fraction(1, 50))
    (root / "a" / "broken.mp4").write_bytes(b"not a video" * 50)
    (root / "train.txt").write_text("a/long_gop.mp4 0\nb/packed.avi 1\nb/vfr.mp4 2\na/broken.mp4 3\n")
    return root


def prepare(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert prepare("--list", sources / "train.txt", "--out", out, "--short-side", SHORT, "--workers", 0) == 0
    return out


def test_output_size_keeps_aspect_and_never_upscales():
    assert output_size(96, 72, 48) == (64, 48)
    assert output_size(72, 96, 48) == (48, 64)
    assert output_size(340, 256, 256) == (340, 256)  # already at the target: unchanged
    assert output_size(95, 71, 256) == (96, 72)  # smaller than the target: not upscaled, only made even
    assert output_size(1920, 1080, 256) == (456, 256)  # 455.1 -> the nearest even


@pytest.mark.parametrize("name", ["a/long_gop", "b/packed", "b/vfr"])
def test_copy_holds_every_frame_resized(sources, prepared, name):
    source = next(sources.glob(f"{name}.*"))
    copy = prepared / f"{name}.mp4"
    # the expected frame i: frame i of a plain decode of the source, resized as prepare resizes (swscale
    # area to yuv420p), shown as RGB the way the copy's frames are
    expected = [f.reformat(64, 48, format="yuv420p", interpolation="AREA").to_ndarray(format="rgb24")
                for f in iter_frames(source)]
    got = decode_all_frames(copy).numpy()
    assert got.shape == (len(expected), 48, 64, 3)
    mse = ((got.astype(np.float64) - np.stack(expected)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
    assert psnr.min() > MIN_PSNR_DB, f"worst frame {psnr.argmin()}: {psnr.min():.1f} dB"


@pytest.mark.parametrize("name", ["a/long_gop", "b/packed", "b/vfr"])
def test_copy_keyframes_every_keyint_and_seeks_sparsely(sources, prepared, name):
    copy = prepared / f"{name}.mp4"
    index = get_index(copy)
    assert index.exact
    keys = np.nonzero(index.is_key)[0]
    assert keys.tolist() == list(range(0, index.num_frames, 16))
    in_decode_order = [p[0] for p in packets(copy)]
    assert in_decode_order == sorted(in_decode_order)  # no B-frames (see prepare's docstring)
    wanted = [5, 17, 18, 40, index.num_frames - 1]
    stats = DecodeStats()
    sparse = decode_frames(copy, wanted, stats=stats)
    assert (stats.sparse_decodes, stats.fallbacks) == (1, 0)
    assert np.array_equal(sparse.numpy(), decode_all_frames(copy, wanted).numpy())


def test_list_rewritten_and_unreadable_listed(sources, prepared):
    samples = read_list_file(prepared / "train.txt", prepared)
    assert samples == [(str(prepared / "a/long_gop.mp4"), 0), (str(prepared / "b/packed.mp4"), 1),
                       (str(prepared / "b/vfr.mp4"), 2)]
    bad = [json.loads(line) for line in (prepared / "train.txt.unreadable.jsonl").read_text().splitlines()]
    assert [(b["source"], b["status"]) for b in bad] == [("a/broken.mp4", "unreadable")]
    assert "cannot open container" in bad[0]["reason"]
    assert not list(prepared.rglob("*.tmp.mp4"))


def test_kinetics_csv_round_trips(sources, tmp_path):
    root = tmp_path / "k400"
    for label, youtube_id, seed in (("abseiling", "AAA", 4), ("air drumming", "BBB", 5)):
        folder = root / label.replace(" ", "_")
        folder.mkdir(parents=True)
        write_encoded(folder / f"{youtube_id}_000010_000020.mp4", moving_pattern(20, seed=seed), "libx264", gop=250)
    (root / "abseiling" / "CCC_000001_000011.mp4").write_bytes(b"")
    rows = [["label", "youtube_id", "time_start", "time_end", "split"], ["abseiling", "AAA", "10", "20", "val"],
            ["abseiling", "CCC", "1", "11", "val"], ["air drumming", "BBB", "10", "20", "val"]]
    with open(tmp_path / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "out"
    assert prepare("--list", tmp_path / "val.csv", "--data-root", root, "--out", out, "--short-side", SHORT,
                   "--workers", 0) == 0
    with open(out / "val.csv", newline="") as f:
        assert list(csv.reader(f)) == [rows[0], rows[1], rows[3]]
    original = read_kinetics_csv(tmp_path / "val.csv", root)
    copied = read_kinetics_csv(out / "val.csv", out)
    assert copied == [(p.replace(str(root), str(out)), label) for p, label in original if "CCC" not in p]
    assert all(os.path.isfile(p) for p, _ in copied)


def test_lists_share_a_folder_with_the_same_encoding_only(sources, tmp_path, capsys):
    out = tmp_path / "out"
    (sources / "val.txt").write_text("b/vfr.mp4 2\n")
    for listing in ("train.txt", "val.txt"):
        assert prepare("--list", sources / listing, "--out", out, "--short-side", SHORT, "--workers", 0) == 0
    assert read_list_file(out / "val.txt", out) == [(str(out / "b/vfr.mp4"), 2)]
    assert len(read_list_file(out / "train.txt", out)) == 3
    assert prepare("--list", sources / "val.txt", "--out", out, "--short-side", 32, "--workers", 0) == 2
    assert "short_side: 48 there, 32 now" in capsys.readouterr().err
    assert prepare("merge", "--out", out) == 0  # both lists again
    merged = capsys.readouterr().out
    assert "3 of 4 videos prepared" in merged and "1 of 1 videos prepared" in merged


def test_shards_cover_the_list_and_merge_writes_one(sources, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--list", sources / "train.txt", "--out", out, "--short-side", SHORT]
    assert prepare(*common, "--shard", "0/2", "--workers", 2) == 0
    assert prepare("merge", "--out", out) == 2
    assert "train.txt: shard 1/2 has not run" in capsys.readouterr().err
    assert prepare(*common, "--shard", "1/2", "--workers", 0) == 0
    assert not (out / "train.txt").exists()  # a sharded run leaves the list to merge
    assert prepare("merge", "--out", out) == 0
    manifests = [(out / "_prepare" / f"train.txt.manifest-{i}-of-2.jsonl").read_text() for i in range(2)]
    mine = [[json.loads(line)["source"] for line in text.splitlines()] for text in manifests]
    assert sorted(mine[0] + mine[1]) == sorted(["a/long_gop.mp4", "b/packed.avi", "b/vfr.mp4", "a/broken.mp4"])
    assert not set(mine[0]) & set(mine[1])
    assert [p for p, _ in read_list_file(out / "train.txt", out)] == [
        str(out / "a/long_gop.mp4"), str(out / "b/packed.mp4"), str(out / "b/vfr.mp4")]


def test_resumes_after_sigkill(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    names = ["s0.mp4", "s1.mp4", "big.mp4", "s2.mp4"]
    for i, name in enumerate(names):  # a large frame in the third video keeps the run busy when it is killed
        size = (480, 640) if name == "big.mp4" else (72, 96)
        write_encoded(root / name, moving_pattern(48 if name == "big.mp4" else 16, *size, seed=i), "libx264",
                      gop=250, options={"preset": "ultrafast"})
    (root / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "out"
    manifest = out / "_prepare" / "list.txt.manifest-0-of-1.jsonl"
    cmd = [sys.executable, "-m", "m2clip_fast.data.prepare", "--list", str(root / "list.txt"), "--out", str(out),
           "--short-side", "480", "--workers", "0", "--preset", "slow"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(line)["source"] for line in manifest.read_text().splitlines()]
    assert done == ["s0.mp4", "s1.mp4"], "the run was not killed while preparing big.mp4"
    assert not (out / "big.mp4").exists() and not (out / "train.txt").exists()
    (out / "s1.mp4").write_bytes((out / "s1.mp4").read_bytes()[:100])  # a torn copy is redone
    kept = (out / "s0.mp4").stat().st_mtime_ns
    time.sleep(0.01)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done, 3 prepared" in rerun.stdout
    assert (out / "s0.mp4").stat().st_mtime_ns == kept
    for name in names:  # sources already at or under --short-side keep their size (not upscaled)
        assert decode_all_frames(out / name).shape == decode_all_frames(root / name).shape
    assert [label for _, label in read_list_file(out / "list.txt", out)] == [0, 1, 2, 3]
    assert not list(out.rglob("*.tmp.mp4"))


def test_hmdb51_split_becomes_train_and_test_lists(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    marks = {"brush_hair": [("v1.avi", 1), ("v2.avi", 2)], "cartwheel": [("v3.avi", 1), ("v4.avi", 0)]}
    for seed, (cls, videos) in enumerate(marks.items()):
        (root / cls).mkdir(parents=True)
        for name, _ in videos:
            write_encoded(root / cls / name, moving_pattern(12, seed=seed), "mpeg4", bframes=2)
        (splits / f"{cls}_test_split1.txt").write_text("".join(f"{n} {m}\n" for n, m in videos))
    out = tmp_path / "out"
    assert prepare("--list", splits / "cartwheel_test_split1.txt", "--data-root", root, "--out", out,
                   "--short-side", SHORT, "--workers", 0) == 0
    assert read_list_file(out / "hmdb51_split1_train_list.txt", out) == [
        (str(out / "brush_hair/v1.mp4"), 0), (str(out / "cartwheel/v3.mp4"), 1)]
    assert read_list_file(out / "hmdb51_split1_test_list.txt", out) == [(str(out / "brush_hair/v2.mp4"), 0)]
    assert not (out / "cartwheel" / "v4.mp4").exists()  # marked 0: in neither part


def test_ssv2_json_becomes_a_list_numbered_by_the_class_names(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for seed, video in enumerate(("101", "102")):
        write_encoded(root / f"{video}.webm", moving_pattern(12, seed=seed), "libvpx-vp9", gop=250)
    (tmp_path / "validation.json").write_text(json.dumps([
        {"id": "101", "template": "Pushing [something] from left to right"},
        {"id": "102", "template": "Holding [something]"}]))
    (tmp_path / "classes.txt").write_text("Holding something\nOpening something\n"
                                          "Pushing something from left to right\n")
    out = tmp_path / "out"
    assert prepare("--list", tmp_path / "validation.json", "--data-root", root, "--out", out, "--class-names",
                   tmp_path / "classes.txt", "--short-side", SHORT, "--workers", 0) == 0
    assert read_list_file(out / "validation_list.txt", out) == [(str(out / "101.mp4"), 2), (str(out / "102.mp4"), 0)]
