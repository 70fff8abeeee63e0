"""decode_frames on a matrix of containers and codecs: frame i is the i-th frame of a plain full decode.

The reference is PyAV's plain in-order decode (``for frame in container.decode(stream)``), independent of
our index. Files are real, written by FFmpeg's encoders (and, for the DivX/XviD packed B-frame layout that
FFmpeg never writes, laid out from the mpeg4 encoder's packets as XviD does; see video_formats).

Both CPU backends must return exactly those pixels: PyAV (``decode``), and torchcodec (where installed), which
decodes the formats the matrix marks "torchcodec" and hands the others to PyAV for the reason given.
"""
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2clip_fast.data import decode as decode_module
from m2clip_fast.data import frames as backends
from m2clip_fast.data.decode import (DecodeStats, clear_index_cache, decode_frames, decode_sampled, get_index,
                                     num_frames, process_stats)
from m2clip_fast.data.torchcodec_backend import (NotServed, decode_frames_torchcodec, torchcodec_available,
                                                 unserved_reason)
from m2clip_fast.data.synthetic import textured_frames, write_video
from video_formats import (packets, plain_decode, remux, write_encoded, write_mpeg4_avi_with_dropped_frames,
                           write_packed_mpeg4_avi)

H, W = 48, 64
RAW = "a raw stream without container timestamps"


def frames(n, seed=1):
    return textured_frames(n, H, W, seed=seed)


def x264(keyint, bframes=3, extra=""):
    return {"preset": "veryfast",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}{extra}"}


def _vfr_pts(n):
    return np.cumsum(np.random.default_rng(0).integers(20, 80, n))  # ms: 12.5 to 50 fps


def _edit_list_cut(path):
    src = write_encoded(path.with_name("uncut.mp4"), frames(45), "libx264", options=x264(8, 2))
    return remux(src, path, shift=5 * 512)  # a stream-copy cut: 5 frames of 1/12800 s x 512


def _hevc(path):
    if "libx265" not in __import__("av").codecs_available:
        pytest.skip("this FFmpeg has no libx265 encoder")
    return write_encoded(path, frames(60), "libx265", options={
        "preset": "ultrafast",
        "x265-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:open-gop=1:log-level=error"})


# name -> (writer, path the decoder must take: "sparse" or the fallback's reason)
MATRIX = {
    "xvid_packed.avi": (lambda p: write_packed_mpeg4_avi(p, frames(60), tag="XVID", gop=12, bframes=2),
                        "MPEG-4 placeholder (N-VOP) or packed B-frame packets"),
    "dx50_packed.avi": (lambda p: write_packed_mpeg4_avi(p, frames(60), tag="DX50", gop=30, bframes=1),
                        "MPEG-4 placeholder (N-VOP) or packed B-frame packets"),
    "xvid_dropped_frames.avi": (lambda p: write_mpeg4_avi_with_dropped_frames(p, frames(50)),
                                "MPEG-4 placeholder (N-VOP) or packed B-frame packets"),
    "mpeg4_bframes.avi": (lambda p: write_video(p, frames(60), codec="mpeg4", gop=12, bframes=2), "sparse"),
    "mpeg4_gop12.avi": (lambda p: write_video(p, frames(60), codec="mpeg4", gop=12, bframes=0), "sparse"),
    "mpeg4_raw.m4v": (lambda p: write_encoded(p, frames(60), "mpeg4", fmt="m4v", bframes=2), RAW),
    "h264_open_gop.mp4": (lambda p: write_encoded(p, frames(60), "libx264", options=x264(12, 3, ":open-gop=1")),
                          "sparse"),
    "h264_open_gop.mkv": (lambda p: write_encoded(p, frames(60), "libx264", options=x264(12, 3, ":open-gop=1")),
                          "sparse"),
    "h264_offset.ts": (lambda p: write_encoded(p, frames(60), "libx264", options=x264(12, 2),
                                               pts=np.arange(60) + 250), "sparse"),  # starts at 10 s
    "h264_raw.h264": (lambda p: write_encoded(p, frames(60), "libx264", fmt="h264", options=x264(12, 2)), RAW),
    "h264_bframes.avi": (lambda p: write_encoded(p, frames(60), "libx264", options=x264(12, 2)),
                         "timestamps in decode order although the codec reorders frames"),
    "h264_vfr.mp4": (lambda p: write_encoded(p, frames(60), "libx264", options=x264(12, 2),
                                             time_base=Fraction(1, 1000), pts=_vfr_pts(60)), "sparse"),
    "h264_edit_list.mp4": (_edit_list_cut, "sparse"),
    "h264_keyint1.mp4": (lambda p: write_encoded(p, frames(40), "libx264", gop=1, options=x264(1, 0)), "sparse"),
    "h264_keyint250.mp4": (lambda p: write_encoded(p, frames(300), "libx264", options=x264(250, 3)), "sparse"),
    "vp9.webm": (lambda p: write_video(p, frames(60), codec="vp9", gop=12), "sparse"),
    "mjpeg.avi": (lambda p: write_encoded(p, frames(40), "mjpeg", pix_fmt="yuvj420p"), "sparse"),
    "hevc_open_gop.mp4": (_hevc, "sparse"),
    "h264_10bit.mp4": (lambda p: write_encoded(p, frames(36), "libx264", pix_fmt="yuv420p10le", options=x264(12, 2)),
                       "sparse"),
    "mjpeg_422.avi": (lambda p: write_encoded(p, frames(30), "mjpeg", pix_fmt="yuvj422p"), "sparse"),
    "mjpeg_444.avi": (lambda p: write_encoded(p, frames(30), "mjpeg", pix_fmt="yuvj444p"), "sparse"),
    "h264_yuv422.mp4": (lambda p: write_encoded(p, frames(36), "libx264", pix_fmt="yuv422p", options=x264(12, 2)),
                        "sparse"),
    "h264_yuv444.mkv": (lambda p: write_encoded(p, frames(36), "libx264", pix_fmt="yuv444p", options=x264(12, 2)),
                        "sparse"),
}
TORCHCODEC = "torchcodec"
# name -> "torchcodec" where torchcodec decodes the file, else the start of the reason it is handed to PyAV
# (files PyAV's index cannot show exact: always)
TORCHCODEC_ROUTE = {
    **{name: "frames decoded by PyAV's rules" for name, (_, path) in MATRIX.items() if path != "sparse"},
    **{name: TORCHCODEC for name, (_, path) in MATRIX.items() if path == "sparse"},
    "mpeg4_bframes.avi": "torchcodec loses frames of AVIs whose codec reorders frames",
    "h264_offset.ts": "torchcodec seeks MPEG-TS to other frames than asked",
    "h264_10bit.mp4": "torchcodec's RGB of pixel format yuv420p10le differs from PyAV's",
}
DECODERS = ["pyav", pytest.param(TORCHCODEC, marks=pytest.mark.skipif(
    not torchcodec_available(), reason="torchcodec (with FFmpeg libraries) is not installed"))]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """name -> (path, reference frames uint8 (N, H, W, 3), reference pts)."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, (write, _) in MATRIX.items():
        try:
            path = write(root / name)
        except pytest.skip.Exception:
            continue
        ref, pts = plain_decode(path)
        out[name] = (path, torch.from_numpy(ref), pts)
    return out


def _file(matrix, name):
    if name not in matrix:
        pytest.skip(f"{name} could not be written here (encoder missing)")
    return matrix[name]


def test_the_files_have_the_layouts_that_break_timestamp_seeking(matrix):
    """Guards the matrix itself: each file shows the property its entry is there for."""
    path, ref, pts = _file(matrix, "xvid_packed.avi")
    pk = packets(path)
    assert len(pk) == len(ref) == 60  # one AVI chunk per frame, placeholders included
    assert sum(size == 7 for _, _, size, _ in pk) == 20  # an N-VOP after each B-frame pair
    assert any(p != d for p, d, _, _ in pk)
    assert pts != sorted(pts)  # the decoded frames' pts are not monotonic: 1, 2, 4, 3, 5, 7, 6, ...
    assert pts[:7] == [1, 2, 4, 3, 5, 7, 6]
    _, ref_dx50, pts_dx50 = _file(matrix, "dx50_packed.avi")
    assert pts_dx50 != sorted(pts_dx50)
    path, ref, _ = _file(matrix, "xvid_dropped_frames.avi")
    assert len(packets(path)) == 57 and len(ref) == 50  # N-VOPs: 7 packets without a frame
    _, _, pts = _file(matrix, "h264_bframes.avi")
    assert pts != sorted(pts)
    assert all(p is None for p, _, _, _ in packets(_file(matrix, "h264_raw.h264")[0]))
    assert packets(_file(matrix, "h264_offset.ts")[0])[0][0] >= 10 * 90_000  # pts from 10 s on
    vfr = np.diff(_file(matrix, "h264_vfr.mp4")[2])
    assert vfr.min() < vfr.max()
    cut = _file(matrix, "h264_edit_list.mp4")
    assert len(cut[1]) == 40 and len(packets(cut[0])) == 45  # 5 packets decoded but never shown
    assert get_index(_file(matrix, "h264_10bit.mp4")[0]).pix_fmt == "yuv420p10le"
    pixel_formats = {"mjpeg.avi": "yuvj420p", "mjpeg_422.avi": "yuvj422p", "mjpeg_444.avi": "yuvj444p",
                     "h264_yuv422.mp4": "yuv422p", "h264_yuv444.mkv": "yuv444p", "vp9.webm": "yuv420p"}
    for name, pix_fmt in pixel_formats.items():
        assert get_index(_file(matrix, name)[0]).pix_fmt == pix_fmt, name
    assert get_index(_file(matrix, "mpeg4_bframes.avi")[0]).reorders
    assert not get_index(_file(matrix, "mpeg4_gop12.avi")[0]).reorders
    for name, interval in (("h264_keyint1.mp4", 1), ("mpeg4_gop12.avi", 12), ("h264_keyint250.mp4", 250)):
        keys = [i for i, (_, _, _, key) in enumerate(packets(_file(matrix, name)[0])) if key]
        assert np.diff(keys).tolist() == [interval] * (len(keys) - 1) and len(keys) > 1, name


@pytest.mark.parametrize("name", list(MATRIX))
def test_fast_path_only_where_the_index_shows_it_exact(matrix, name):
    """Exact files seek from the first request. The others are decoded through once, which learns them;
    then they seek in the learned order, except raw streams, which always decode through."""
    path, ref, _ = _file(matrix, name)
    expected = MATRIX[name][1]
    clear_index_cache()
    index = get_index(path)
    assert index.exact == (expected == "sparse") and index.inexact_reason == ("" if expected == "sparse" else expected)
    n = len(ref)
    requests = [np.arange(s, min(n, s + 8)) for s in range(0, n, max(1, n // 6))] + [[n - 1, 0]]
    stats = DecodeStats()
    for idx in requests:
        assert torch.equal(decode_frames(path, idx, stats=stats), ref[idx]), idx
    decoded_through = {"sparse": 0, RAW: len(requests)}.get(expected, 1)
    assert (stats.sparse_decodes, stats.fallbacks) == (len(requests) - decoded_through, decoded_through)
    if expected == "sparse":  # every seek lands on its keyframe at once (mpegts: sought by dts)
        assert stats.seek_retries == 0
    assert stats.full_decodes == decoded_through and stats.fallback_files == ({str(path)} if decoded_through else set())
    assert (get_index(path).learned is not None) == (expected not in ("sparse", RAW))
    assert num_frames(path) == n


def test_eight_frame_windows_of_a_packed_xvid_avi(matrix):
    """What broke on a real XviD file: windows of 8 consecutive frames raised 'frame N missing from the stream'
    or came back as other frames. Every window must now be the plain decode's frames."""
    path, ref, _ = _file(matrix, "xvid_packed.avi")
    for start in range(0, len(ref) - 8, 4):
        clear_index_cache()
        idx = np.arange(start, start + 8)
        assert torch.equal(decode_frames(path, idx), ref[idx]), start


def _requests(n):
    index = st.integers(0, n - 1)
    window = st.tuples(st.integers(0, n - 1), st.integers(1, 16), st.integers(1, 4)).map(
        lambda t: np.arange(t[0], min(n, t[0] + t[1] * t[2]), t[2]))
    uniform = st.integers(1, 16).map(lambda k: np.linspace(0, n - 1, k).round().astype(np.int64))
    return st.one_of(
        st.lists(index, min_size=1, max_size=12),  # unsorted, repeats likely
        st.lists(index, min_size=1, max_size=12, unique=True).map(sorted),
        st.just([0, n - 1, 0]), st.just([n - 1]),
        window, uniform,
    )


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", list(MATRIX))
def test_property_decode_frames_equals_plain_decode(matrix, name, decoder):
    path, ref, _ = _file(matrix, name)
    served = decoder == TORCHCODEC and TORCHCODEC_ROUTE[name] == TORCHCODEC

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(idx=_requests(len(ref)), cold=st.booleans(), threads=st.sampled_from([1, 0]))
    def check(idx, cold, threads):
        if cold:  # the first request to a file, before anything about it is cached
            clear_index_cache()
        stats = DecodeStats()
        out = backends.decode_frames(path, idx, backend=decoder, threads=threads, stats=stats)
        assert out.dtype == torch.uint8 and out.shape == (len(idx), H, W, 3)
        assert torch.equal(out, ref[torch.as_tensor(np.asarray(idx, dtype=np.int64))])
        assert stats.torchcodec_decodes == int(served)  # a served format is never handed on to PyAV

    check()


@pytest.mark.skipif(not torchcodec_available(), reason="torchcodec (with FFmpeg libraries) is not installed")
@pytest.mark.parametrize("name", list(MATRIX))
def test_torchcodec_serves_exactly_the_formats_it_gets_right(matrix, name):
    """Served files are answered by torchcodec on every request; the others go to PyAV for their reason. Frames
    equal the plain decode either way (also for torchcodec's own decode of every frame in one request)."""
    path, ref, _ = _file(matrix, name)
    clear_index_cache()
    route = TORCHCODEC_ROUTE[name]
    reason = unserved_reason(get_index(path))
    assert (reason == "") if route == TORCHCODEC else reason.startswith(route), reason
    n = len(ref)
    requests = [np.arange(n), np.arange(n - 1, -1, -7), [n - 1, 0, n - 1]]
    stats = DecodeStats()
    for idx in requests:
        assert torch.equal(backends.decode_frames(path, idx, backend=TORCHCODEC, stats=stats), ref[idx]), idx
    served = len(requests) if route == TORCHCODEC else 0
    assert (stats.torchcodec_decodes, stats.torchcodec_routed) == (served, len(requests) - served)
    assert stats.routed_files == (set() if served else {str(path)})


def test_runtime_checks_catch_what_the_index_missed(matrix, monkeypatch):
    """With the index's own checks switched off, h264-in-AVI (made-up timestamps) passes as exact; decoding a
    window shows frames out of order, so the request is decoded through, right, and the file remembered."""
    path, ref, _ = _file(matrix, "h264_bframes.avi")
    clear_index_cache()
    monkeypatch.setattr(decode_module, "_inexact_reason", lambda *args: "")
    assert get_index(path).exact
    stats = DecodeStats()
    assert torch.equal(decode_frames(path, np.arange(0, 12), stats=stats), ref[:12])
    assert (stats.sparse_decodes, stats.fallbacks) == (0, 1)
    index = get_index(path)
    assert not index.exact and ("not output" in index.inexact_reason or "order" in index.inexact_reason)
    assert index.decoded_frames == len(ref) and index.learned is not None
    assert torch.equal(decode_frames(path, [40, 38], stats=stats), ref[[40, 38]])  # seeking, in the learned order
    # one seek by the failed first attempt, one in the learned order
    assert (stats.sparse_decodes, stats.fallbacks, stats.full_decodes, stats.seeks) == (1, 1, 1, 2)


def test_decode_sampled_chooses_from_the_decoded_count(matrix):
    """A file with N-VOP 'dropped frames' has more packets (57) than frames (50): indices are chosen from 50."""
    path, ref, _ = _file(matrix, "xvid_dropped_frames.avi")
    clear_index_cache()
    seen = []

    def choose(n):
        seen.append(n)
        return np.arange(n - 8, n)

    before = process_stats()
    idx, out = decode_sampled(path, choose)
    assert seen == [50] and idx.tolist() == list(range(42, 50)) and torch.equal(out, ref[42:])
    after = process_stats()
    assert after.fallbacks == before.fallbacks + 1 and str(path) in after.fallback_files
    assert after.full_decodes == before.full_decodes + 1  # one decode both counted and delivered
    assert num_frames(path) == 50


def test_fast_path_stays_sparse(matrix):
    """On an exact file the fast path decodes a fraction of the video: a window deep in the 300-frame
    keyint-250 file needs its GOP from frame 250 only."""
    path, ref, _ = _file(matrix, "h264_keyint250.mp4")
    stats = DecodeStats()
    assert torch.equal(decode_frames(path, np.arange(280, 288), stats=stats), ref[280:288])
    assert stats.seeks == 1 and stats.frames_decoded <= 40


def test_each_sign_of_the_packed_layout_is_recognised(matrix):
    """N-VOP placeholders, the DivX 'packed' user data on keyframes, and two frames in one packet each mark a
    file; an unpacked MPEG-4 AVI with B-frames shows none of them."""
    import av

    def demuxed(name):
        with av.open(str(_file(matrix, name)[0])) as container:
            return [p for p in container.demux(video=0) if p.size]

    sign = decode_module._placeholder_or_packed
    packed = demuxed("xvid_packed.avi")
    nvop = next(p for p in packed if p.size == 7)
    key = next(p for p in packed if p.is_keyframe)
    pair = next(p for p in packed if bytes(p).count(b"\x00\x00\x01\xb6") == 2 and not p.is_keyframe)
    late = decode_module._WHOLE_PACKETS_CHECKED
    assert sign(nvop, late) and sign(key, late) and sign(pair, 3)
    assert not sign(pair, late)  # past the first packets, only placeholders and keyframe headers are read
    assert not any(sign(p, i) for i, p in enumerate(demuxed("mpeg4_bframes.avi")))


@pytest.mark.skipif(not torchcodec_available(), reason="torchcodec (with FFmpeg libraries) is not installed")
@pytest.mark.parametrize("name", ["mpeg4_bframes.avi", "h264_offset.ts", "h264_10bit.mp4"])
def test_the_formats_handed_to_pyav_are_ones_torchcodec_gets_wrong(matrix, name):
    """Each format rule stands for a real failure: with the rule lifted (the index made to look like an 8-bit mp4),
    torchcodec fails, returns frames its pts check rejects, or pixels that are not PyAV's. When a torchcodec
    release gets one right, this fails: then drop its rule."""
    path, ref, _ = _file(matrix, name)
    clear_index_cache()
    looks_served = replace(get_index(path), container="mp4", reorders=False, pix_fmt="yuv420p")
    assert unserved_reason(looks_served) == ""
    wrong = 0
    for idx in (np.arange(len(ref)), np.arange(len(ref) - 1, -1, -5)):
        try:
            wrong += not torch.equal(decode_frames_torchcodec(path, idx, index=looks_served, threads=1), ref[idx])
        except NotServed:
            wrong += 1
    assert wrong > 0
