"""The torchcodec backend beyond the format matrix: its checks hand bad answers to PyAV, its errors, its counters,
the loader and the commands with ``--decoder torchcodec``, and a clear error where torchcodec cannot run."""
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from m2clip_fast.data import DecodeStats, VideoClipDataset, VideoDecodeError, decode_all_frames, get_index
from m2clip_fast.data import torchcodec_backend as tc
from m2clip_fast.data.decode import clear_index_cache, process_stats
from m2clip_fast.data.frames import decode_frames, decode_sampled
from m2clip_fast.data.loader import resolve_decoder
from m2clip_fast.data.synthetic import textured_frames, write_video
from m2clip_fast.errors import UserError

needs_torchcodec = pytest.mark.skipif(not tc.torchcodec_available(),
                                      reason="torchcodec (with FFmpeg libraries) is not installed")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """An H.264 mp4 with B-frames (48 frames, keyframe every 12) and its whole-video decode."""
    path = write_video(tmp_path_factory.mktemp("tc") / "v.mp4", textured_frames(48, 48, 64, seed=4), gop=12,
                       bframes=2)
    return path, decode_all_frames(path)


@needs_torchcodec
def test_a_served_file_is_decoded_by_torchcodec_and_counted(video):
    path, full = video
    clear_index_cache()
    before = process_stats()
    stats = DecodeStats()
    idx = np.array([47, 3, 3, 20, 0])
    assert torch.equal(decode_frames(path, idx, backend="torchcodec", stats=stats), full[idx])
    assert (stats.torchcodec_decodes, stats.torchcodec_routed, stats.sparse_decodes, stats.fallbacks) == (1, 0, 0, 0)
    assert stats.frames_returned == 5 and stats.index_builds == 1 and stats.frames_decoded == 0  # PyAV's codec idle
    after = process_stats()
    assert after.torchcodec_decodes == before.torchcodec_decodes + 1


@needs_torchcodec
def test_decode_sampled_chooses_from_the_index_count(video):
    path, full = video
    seen = []
    idx, out = decode_sampled(path, lambda n: seen.append(n) or np.arange(n - 4, n), backend="torchcodec")
    assert seen == [48] and idx.tolist() == [44, 45, 46, 47] and torch.equal(out, full[44:])


@needs_torchcodec
def test_frames_that_fail_the_checks_are_not_returned(video):
    """Frame mappings a tick off the file's pts: torchcodec returns the file's frames, whose pts the check finds
    to differ from the index's; an index of another width: the shape check. Either raises NotServed."""
    path, _ = video
    index = get_index(path)
    with pytest.raises(tc.NotServed, match="another frame than frame 5"):
        tc.decode_frames_torchcodec(path, [30, 5, 6], index=replace(index, pts=index.pts + 1), threads=1)
    with pytest.raises(tc.NotServed, match="frames of shape"):
        tc.decode_frames_torchcodec(path, [5], index=replace(index, width=index.width + 2), threads=1)


@needs_torchcodec
def test_a_file_torchcodec_cannot_decode_gets_pyavs_answer(tmp_path, video):
    """The packets of the second half overwritten with noise: PyAV's index still reads the file, torchcodec may
    fail or conceal differently; either way the torchcodec backend answers exactly what the PyAV backend does
    (its frames, or its VideoDecodeError naming the file)."""
    path, _ = video
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 2
    data[start:start + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))

    def answer(backend):
        clear_index_cache()
        try:
            return decode_frames(broken, np.arange(0, 48, 3), backend=backend, threads=1)
        except VideoDecodeError as exc:
            return exc.path, exc.reason

    pyav, torchcodec = answer("pyav"), answer("torchcodec")
    if isinstance(pyav, tuple):
        assert torchcodec == pyav == (str(broken), pyav[1])
    else:
        assert isinstance(torchcodec, torch.Tensor) and torch.equal(torchcodec, pyav)


@needs_torchcodec
def test_the_loader_gives_the_same_clips_with_either_cpu_decoder(video):
    path, _ = video
    samples = [(str(path), 0)] * 3
    common = dict(num_frames=4, sampling="uniform", train=True, size=32, seed=7)
    pyav = VideoClipDataset(samples, decoder="pyav", **common)
    torchcodec = VideoClipDataset(samples, decoder="torchcodec", **common)
    for i in range(3):
        a, b = pyav[i], torchcodec[i]
        assert torch.equal(a["video"], b["video"]) and b["decoded"] == {"path": str(path), "fallback": False}
    assert resolve_decoder("torchcodec", torch.device("cpu")).name == "torchcodec"
    assert resolve_decoder("auto", torch.device("cpu")).name == "pyav"


def test_without_torchcodec_the_backend_says_how_to_install_it(monkeypatch, video):
    """torchcodec not importable, or importable without FFmpeg libraries (it then imports, and fails on first use):
    one-line user errors with the install hint, before any file is opened."""
    path, _ = video
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # what `import torchcodec` meets when it is not installed
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert not tc.torchcodec_available()
    for call in (lambda: decode_frames(path, [0], backend="torchcodec"),
                 lambda: resolve_decoder("torchcodec", torch.device("cpu")),
                 lambda: decode_frames("/no/such/file.mp4", [0], backend="torchcodec")):
        with pytest.raises(tc.TorchcodecUnavailableError, match="pip install torchcodec") as info:
            call()
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@needs_torchcodec
def test_torchcodec_without_ffmpeg_libraries_is_unavailable(monkeypatch):
    import torchcodec

    monkeypatch.setattr(torchcodec, "ffmpeg_major_version", None)  # how torchcodec reports no loadable FFmpeg
    with pytest.raises(tc.TorchcodecUnavailableError, match="no FFmpeg libraries"):
        tc.require_torchcodec()


def test_unserved_reasons_name_the_rule(video):
    """The routing rules read only the index: each changed field gives its reason, the mp4 itself none."""
    path, _ = video
    index = get_index(path)
    assert index.container.startswith("mov,mp4") and index.pix_fmt == "yuv420p" and index.reorders
    assert tc.unserved_reason(index) == ""
    cases = {
        "frames decoded by PyAV's rules (x)": dict(exact=False, inexact_reason="x"),
        "torchcodec seeks MPEG-TS": dict(container="mpegts"),
        "torchcodec loses frames of AVIs": dict(container="avi"),
        "pixel format yuv420p10le": dict(pix_fmt="yuv420p10le"),
        "pixel format None": dict(pix_fmt=None),
        "odd frame sizes (65x48)": dict(width=65),
    }
    for reason, change in cases.items():
        assert reason in tc.unserved_reason(replace(index, **change)), change
    assert tc.unserved_reason(replace(index, container="avi", reorders=False)) == ""


@needs_torchcodec
def test_evaluate_with_decoder_torchcodec_scores_as_with_pyav(synthetic_dataset, demo_checkpoint, tmp_path, capsys):
    """The command line end to end: the same frames, so the same multi-view scores and every video's top-5 scores
    (predictions.jsonl), to the last digit."""
    import json

    from m2clip_fast.evaluate import main as evaluate_main

    def scores(decoder):
        report = tmp_path / decoder
        assert evaluate_main(["--checkpoint", str(demo_checkpoint), "--val-list", str(synthetic_dataset / "val.txt"),
                              "--views", "2x3", "--workers", "0", "--device", "cpu", "--json",
                              "--decoder", decoder, "--report", str(report)]) == 0
        result = json.loads(capsys.readouterr().out)
        top = {k: v for k, v in result.items() if k.startswith(("top", "num_samples"))}
        return top, (report / "predictions.jsonl").read_text()

    pyav, pyav_videos = scores("pyav")
    before = process_stats()
    torchcodec, torchcodec_videos = scores("torchcodec")
    after = process_stats()  # --workers 0: decoded in this process, every clip by torchcodec
    assert after.torchcodec_decodes - before.torchcodec_decodes == 8
    assert after.torchcodec_routed == before.torchcodec_routed
    assert pyav["num_samples"] == 8 and torchcodec == pyav
    assert len(pyav_videos.splitlines()) == 8 and torchcodec_videos == pyav_videos
