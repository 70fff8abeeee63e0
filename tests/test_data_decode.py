"""decode_frames against the whole-video decode, on real files written by our own encoder."""
import pickle

import numpy as np
import pytest
import torch

from m2clip_fast.data import DecodeStats, VideoDecodeError, decode_all_frames, decode_frames, get_index, num_frames
from m2clip_fast.data.decode import clear_index_cache
from m2clip_fast.data.synthetic import textured_frames, write_broken_video, write_video
from m2clip_fast.data.torchcodec_backend import torchcodec_available
from video_formats import remux, write_encoded

# the CPU backends that must agree with the whole-video decode (torchcodec hands the files it does not
# serve to PyAV: here the mpegts start offset, gray and the odd size)
CPU_BACKENDS = ["pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(
    not torchcodec_available(), reason="torchcodec (with FFmpeg libraries) is not installed"))]

N_FRAMES = 90
# (name, codec, extension, gop, bframes)
VARIANTS = [
    ("h264_bframes_short_gop", "h264", ".mp4", 6, 2),
    ("h264_bframes_long_gop", "h264", ".mp4", 60, 3),
    ("h264_bframes_mkv", "h264", ".mkv", 10, 2),
    ("h264_in_avi", "h264", ".avi", 10, 2),
    ("vp9_short_gop", "vp9", ".webm", 6, 0),
    ("vp9_long_gop", "vp9", ".webm", 60, 0),
    ("mpeg4_avi_short_gop", "mpeg4", ".avi", 6, 0),
    ("mpeg4_avi_long_gop_bframes", "mpeg4", ".avi", 60, 2),
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    frames = textured_frames(N_FRAMES, 48, 64, seed=1)
    out = {}
    for name, codec, ext, gop, bframes in VARIANTS:
        path = write_video(root / f"{name}{ext}", frames, codec=codec, gop=gop, bframes=bframes)
        out[name] = (path, decode_all_frames(path))
    return out


def _index_sets(n, seed):
    rng = np.random.default_rng(seed)
    return {
        "sorted": np.sort(rng.choice(n, size=8, replace=False)),
        "unsorted": rng.choice(n, size=8, replace=False),
        "repeated": np.array([7, 7, 3, 7, 3, 50, 50]),
        "first_last": np.array([n - 1, 0, n - 1, 0]),
        "dense_stride": np.arange(9, 9 + 8 * 4, 4),
        "reversed_all": np.arange(n)[::-1].copy(),
        "single": np.array([n // 2]),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_decode_frames_equals_full_decode(videos, name, backend):
    path, full = videos[name]
    assert full.shape == (N_FRAMES, 48, 64, 3) and full.dtype == torch.uint8
    assert num_frames(path) == N_FRAMES
    for kind, idx in _index_sets(N_FRAMES, seed=len(name)).items():
        out = decode_frames(path, idx, backend=backend)
        assert out.dtype == torch.uint8 and out.shape == (len(idx), 48, 64, 3), kind
        assert torch.equal(out, full[torch.as_tensor(idx)]), f"{name}: {kind} {idx.tolist()}"


def test_full_decode_frames_are_distinct(videos):
    # guards the oracle itself: if frames were alike, a wrong-frame bug could pass unnoticed
    _, full = videos["h264_bframes_short_gop"]
    flat = full.reshape(N_FRAMES, -1).float()
    diffs = (flat[1:] - flat[:-1]).abs().mean(1)
    assert diffs.min() > 5


def test_decode_all_frames_subset_and_threads(videos):
    path, full = videos["h264_bframes_long_gop"]
    idx = [5, 80, 5, 0]
    assert torch.equal(decode_all_frames(path, idx, threads=1), full[idx])
    assert torch.equal(decode_frames(path, idx, threads=1), full[idx])
    assert torch.equal(decode_frames(path, idx, threads=2), full[idx])


def test_sparse_request_decodes_a_fraction_of_a_long_video(tmp_path):
    n = 600
    path = write_video(tmp_path / "long.mp4", textured_frames(n, 32, 32, seed=2), codec="h264", gop=25)
    dense = np.arange(300, 300 + 8 * 4, 4)
    stats = DecodeStats()
    out = decode_frames(path, dense, threads=1, stats=stats)
    full_stats = DecodeStats()
    full = decode_all_frames(path, threads=1, stats=full_stats)
    assert torch.equal(out, full[dense])
    assert full_stats.frames_decoded == n
    # frames 300..328 live in the GOPs starting at 300 and 325: at most 29 + 25 frames
    assert stats.frames_decoded <= 54
    assert stats.frames_returned == 8 and stats.index_builds in (0, 1)


def test_seek_or_decode_through_decisions(tmp_path):
    path = write_video(tmp_path / "gop10.avi", textured_frames(100, 32, 32, seed=3), codec="mpeg4", gop=10)
    index = get_index(path)
    assert index.is_key.nonzero()[0].tolist() == list(range(0, 100, 10))
    cases = [
        ([2, 5], 1, 6),  # same GOP: one seek, decode 0..5
        ([2, 8, 9], 1, 10),
        ([2, 55], 2, 3 + 6),  # a keyframe (50) lies beyond the decoder position: seek to it
        ([55, 57], 1, 8),
        ([9, 10], 1, 11),  # the next keyframe directly follows: decoding through is as cheap
        ([95], 1, 6),
    ]
    for idx, seeks, decoded in cases:
        stats = DecodeStats()
        decode_frames(path, idx, threads=1, stats=stats)
        assert (stats.seeks, stats.frames_decoded) == (seeks, decoded), idx


def test_index_cache_reuse_and_invalidation(tmp_path):
    clear_index_cache()
    path = tmp_path / "v.mp4"
    write_video(path, textured_frames(20, 32, 32, seed=4), codec="h264", gop=5)
    stats = DecodeStats()
    decode_frames(path, [3], stats=stats)
    decode_frames(path, [4], stats=stats)
    assert stats.index_builds == 1
    write_video(path, textured_frames(30, 32, 32, seed=5), codec="h264", gop=5)  # new size/mtime
    assert num_frames(path) == 30
    out = decode_frames(path, [29], stats=stats)
    assert torch.equal(out, decode_all_frames(path)[[29]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_request(videos, backend):
    path, _ = videos["vp9_short_gop"]
    out = decode_frames(path, [], backend=backend)
    assert out.shape == (0, 48, 64, 3) and out.dtype == torch.uint8


@pytest.mark.parametrize(
    "kind, ext, reason",
    [
        ("truncated", ".mp4", "truncated"),
        ("garbage", ".mp4", "cannot open container"),
        ("empty", ".mp4", "empty file"),
        ("zero_frames", ".avi", "zero frames"),
        ("no_video_stream", ".mp4", "no video stream"),
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_broken_files_raise_video_decode_error(tmp_path, kind, ext, reason, backend):
    path = write_broken_video(tmp_path / f"bad{ext}", kind)
    for call in (lambda: decode_frames(path, [0], backend=backend), lambda: decode_all_frames(path),
                 lambda: num_frames(path)):
        with pytest.raises(VideoDecodeError) as info:
            call()
        assert reason in info.value.reason and info.value.path == str(path)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_missing_file_and_out_of_range(tmp_path, videos, backend):
    with pytest.raises(VideoDecodeError, match="file not found"):
        decode_frames(tmp_path / "nope.mp4", [0], backend=backend)
    path, _ = videos["h264_bframes_short_gop"]
    for bad in ([N_FRAMES], [0, -1]):
        with pytest.raises(VideoDecodeError, match="out of range for 90 frames"):
            decode_frames(path, bad, backend=backend)
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode_frames(path, [0], backend="opencv")


def test_video_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(VideoDecodeError("/x/y.mp4", "zero frames")))
    assert isinstance(err, VideoDecodeError) and (err.path, err.reason) == ("/x/y.mp4", "zero frames")
    assert "y.mp4" in str(err) and "zero frames" in str(err)


def test_reused_colour_converter_gives_pyavs_own_pixels(tmp_path):
    """decode's one reused, single-threaded swscale context per thread equals PyAV's per-frame to_ndarray,
    also when frames of different sizes and colours alternate through it."""
    import av

    from m2clip_fast.data.decode import _to_rgb

    paths = [write_video(tmp_path / "a.mp4", textured_frames(6, 48, 64, seed=1)),
             write_video(tmp_path / "b.avi", textured_frames(6, 30, 22, seed=2), codec="mpeg4")]
    decoded = []
    for path in paths:
        with av.open(str(path)) as container:
            decoded.append(list(container.decode(video=0)))
    for a, b in zip(*decoded):
        for frame in (a, b):
            assert np.array_equal(_to_rgb(frame), frame.to_ndarray(format="rgb24"))


@pytest.mark.parametrize("ext", [".mp4", ".mov"])
def test_edit_list_cut_video_counts_and_decodes_only_shown_frames(tmp_path, ext):
    """A stream-copy cut (``ffmpeg -ss 0.2 -c copy``) keeps the GOP head before the cut and marks it
    'discard' through an mp4 edit list: those packets are decoded as references but never shown. They must
    not count as frames (they used to: frame numbers shifted, and seeking to the first GOP failed)."""
    src = write_video(tmp_path / "src.mp4", textured_frames(40, 32, 48, seed=6), codec="h264", gop=8, bframes=2)
    src_full = decode_all_frames(src)
    path = remux(src, tmp_path / f"cut{ext}", shift=5 * 512)  # 5 frames of 1/12800 s x 512
    full = decode_all_frames(path)
    assert torch.equal(full, src_full[5:])  # what FFmpeg (and the official loader) shows
    assert num_frames(path) == 35
    for idx in ([0], [34], [3, 0, 4], [34, 0, 17, 8], list(range(35))[::-1]):
        assert torch.equal(decode_frames(path, idx), full[idx]), idx
    with pytest.raises(VideoDecodeError, match="out of range for 35 frames"):
        decode_frames(path, [35])


def test_avi_with_dropped_frames_is_not_truncated(tmp_path):
    """An AVI's header counts its empty 'drop frame' chunks, which the demuxer skips: a file whose
    packets run to the stream's end is complete, not truncated (it used to be skipped as 'truncated')."""
    src = write_video(tmp_path / "src.avi", textured_frames(20, 32, 32, seed=2), codec="mpeg4", gop=5)
    path = remux(src, tmp_path / "dropped.avi", empty_pts=(7, 12))
    full = decode_all_frames(path)
    assert num_frames(path) == len(full) == 18
    assert torch.equal(decode_frames(path, [17, 6, 7, 11, 0]), full[[17, 6, 7, 11, 0]])
    # a file cut short still is truncated
    with pytest.raises(VideoDecodeError, match="truncated"):
        num_frames(write_broken_video(tmp_path / "cut.mp4", "truncated"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unknown_codec_raises_video_decode_error(tmp_path, backend):
    """A stream whose codec this FFmpeg cannot decode has no codec context in PyAV: that used to
    escape as AttributeError (crashing a training run) instead of a VideoDecodeError."""
    good = write_video(tmp_path / "v.avi", textured_frames(6, 32, 32), codec="mpeg4")
    path = tmp_path / "unknown_codec.avi"
    path.write_bytes(good.read_bytes().replace(b"FMP4", b"ZZZZ"))
    for call in (lambda: num_frames(path), lambda: decode_frames(path, [0], backend=backend),
                 lambda: decode_all_frames(path)):
        with pytest.raises(VideoDecodeError, match="no decoder for the video codec"):
            call()


@pytest.mark.parametrize("name, n, h, w, encoder, pix_fmt, fmt", [
    ("single_frame.mp4", 1, 32, 32, "libx264", "yuv420p", None),
    ("odd_size.webm", 9, 33, 47, "libvpx-vp9", "yuv420p", None),
    ("yuv444.mkv", 9, 32, 48, "libx264", "yuv444p", None),
    ("gray.mkv", 9, 32, 48, "libx264", "gray", None),
    ("start_offset.ts", 12, 32, 48, "libx264", "yuv420p", "mpegts"),  # start_time 1.4 s
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unusual_but_valid_videos(tmp_path, name, n, h, w, encoder, pix_fmt, fmt, backend):
    path = write_encoded(tmp_path / name, textured_frames(n, h, w, seed=n), encoder, pix_fmt=pix_fmt, fmt=fmt)
    full = decode_all_frames(path)
    assert full.shape == (n, h, w, 3) and num_frames(path) == n
    idx = np.array([n - 1, 0, n // 2, n - 1])
    assert torch.equal(decode_frames(path, idx, backend=backend), full[idx])
