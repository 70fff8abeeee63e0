"""Real NVIDIA DALI against PyAV on VP9 clips we encode ourselves (CPU decoding: VP8/VP9/MJPEG).

Tolerance. Both decoders run the same VP9 decoding, whose YUV output is bit-exact by the codec
spec; they differ only in the YUV->RGB step. FFmpeg's swscale (our PyAV path) repeats each chroma
sample over its 2x2 block, DALI interpolates chroma bilinearly; on sharp colour edges that alone
moves pixels by up to ~60 levels. So the exact check is made against an independent reference:
PyAV's decoded YUV 4:2:0 planes converted here with BT.601 limited-range coefficients and bilinear
chroma upsampling must equal DALI's RGB within 1 level (float-to-uint8 rounding differs). Against
our swscale RGB frames we check frame identity: each DALI frame is closest to the PyAV frame of the
same index, which any seeking or frame-numbering error would break.
"""
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")

from m2clip_fast.data import DatasetError, VideoDecodeError, decode_all_frames, decode_frames  # noqa: E402
from m2clip_fast.data.dali import dali_available  # noqa: E402
from m2clip_fast.data.dali_loader import DALIClipLoader  # noqa: E402
from m2clip_fast.data.decode import bilinear_bt601_rgb as yuv_reference_rgb  # noqa: E402
from m2clip_fast.data.synthetic import textured_frames, write_broken_video, write_video  # noqa: E402


def _cpu_decoder_works(tmp_path_factory):
    path = write_video(tmp_path_factory.mktemp("probe") / "p.webm", textured_frames(4, 32, 32), codec="vp9")
    try:
        decode_frames(path, [0], backend="dali", device="cpu")
    except (VideoDecodeError, RuntimeError) as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    problem = _cpu_decoder_works(tmp_path_factory)
    if problem:
        pytest.skip(f"DALI's CPU video decoder cannot run here: {problem}")
    root = tmp_path_factory.mktemp("dali")
    paths = [write_video(root / f"v{i}.webm", textured_frames(30, 48, 64, seed=i), codec="vp9", gop=7)
             for i in range(4)]
    return root, paths


def test_dali_frames_match_pyav(vp9):
    _, paths = vp9
    idx = [29, 0, 13, 13, 6, 20]
    out = decode_frames(paths[0], idx, backend="dali", device="cpu")
    assert out.dtype == torch.uint8 and out.shape == (6, 48, 64, 3)
    reference = yuv_reference_rgb(paths[0])
    assert len(reference) == 30
    assert np.abs(out.numpy().astype(np.float64) - reference[idx]).max() <= 1
    swscale = decode_all_frames(paths[0]).float()
    for k, i in enumerate(idx):
        distances = (swscale - out[k].float()).abs().mean(dim=(1, 2, 3))
        assert int(distances.argmin()) == i


def test_dali_all_frames_of_every_clip(vp9):
    _, paths = vp9
    for path in paths[1:]:
        out = decode_frames(path, list(range(30))[::-1], backend="dali", device="cpu").numpy()
        assert np.abs(out - yuv_reference_rgb(path)[::-1]).max() <= 1


def test_dali_cpu_rejects_h264_with_a_clear_reason(tmp_path):
    path = write_video(tmp_path / "a.mp4", textured_frames(4, 32, 32), codec="h264")
    with pytest.raises(VideoDecodeError, match="codec h264 is not supported by DALI's CPU decoder"):
        decode_frames(path, [0], backend="dali", device="cpu")
    with pytest.raises(VideoDecodeError, match="out of range"):
        decode_frames(path, [9], backend="dali", device="cpu")
    assert dali_available()


def test_dali_loader_epochs_shards_and_skips(vp9):
    root, paths = vp9
    bad = write_broken_video(root / "bad.webm", "garbage")
    samples = [(str(p), i) for i, p in enumerate(paths)] + [(str(bad), 0)]
    kwargs = dict(batch_size=2, num_frames=4, size=32, train=True, sampling="uniform", flip=False,
                  device="cpu", seed=1)
    loader = DALIClipLoader(samples, **kwargs)
    assert len(loader) == 3
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [b["video"].shape[0] for b in batches] == [2, 2, 1]
        for b in batches:
            assert b["video"].shape[1:] == (4, 3, 32, 32) and b["video"].dtype == torch.float32
            assert torch.equal(b["label"], b["index"])  # labels were set to the sample index
        skipped = [s for b in batches for s in b["skipped"]]
        assert len(skipped) == 1 and skipped[0]["path"] == str(bad)
        assert "cannot open container" in skipped[0]["reason"]
        epochs.append(batches)
    order = [[b["index"].tolist() for b in e] for e in epochs]
    assert order[0] != order[1]
    fresh = DALIClipLoader(samples, **kwargs)
    fresh.set_epoch(1)
    again = list(fresh)
    assert [b["index"].tolist() for b in again] == order[1]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(again, epochs[1]))
    # normalised pixels: CLIP statistics put [0, 255] into about [-1.8, 2.2]
    assert -1.9 < float(again[0]["video"].min()) and float(again[0]["video"].max()) < 2.2

    shards = [DALIClipLoader(samples, shard_id=r, num_shards=2, **kwargs) for r in range(2)]
    seen = []
    for shard in shards:
        shard.set_epoch(0)
        seen += [i for b in shard for i in b["index"].tolist()]
    assert len(seen) == 6  # 5 samples padded to 2 x 3


def test_dali_loader_raises_when_every_video_fails(tmp_path):
    bad = [(str(write_broken_video(tmp_path / f"b{i}.webm", "garbage", seed=i)), 0) for i in range(2)]
    loader = DALIClipLoader(bad, batch_size=1, num_frames=2, size=16, train=False, device="cpu")
    with pytest.raises(DatasetError, match=r"every item of a batch of 1 failed.*b0\.webm"):
        list(loader)


def test_dali_loader_fills_a_failed_item_from_its_batch(vp9, tmp_path):
    """As VideoClipDataset: an item whose every attempt fails takes a readable item's place in its batch."""
    _, paths = vp9
    bad = [(str(write_broken_video(tmp_path / f"b{i}.webm", "garbage", seed=i)), 0) for i in range(3)]
    samples = bad + [(str(paths[0]), 1)]
    loader = DALIClipLoader(samples, batch_size=4, num_frames=2, size=16, train=False, device="cpu",
                            max_attempts=2)
    (batch,) = list(loader)
    assert batch["index"].tolist() == [3, 3, 3, 3] and batch["label"].tolist() == [1] * 4
    assert {s["path"] for s in batch["skipped"]} == {p for p, _ in bad}


@pytest.mark.parametrize("clips,crops", [(2, 3), (1, 4), (3, 1)])
def test_dali_loader_multi_view_matches_the_pyav_views(vp9, clips, crops):
    """Evaluation views come out clip-major like VideoClipDataset's, and each DALI view is that same
    view: nearest to the PyAV view of its own (clip, crop) and close to it (the decoders' chroma
    upsampling and the resizers differ, and DALI's crop offsets are not rounded down to pixels)."""
    from m2clip_fast.data import VideoClipDataset

    _, paths = vp9
    samples = [(str(p), i) for i, p in enumerate(paths[:2])]
    common = dict(num_frames=4, size=32, train=False, sampling="dense", stride=3, num_clips=clips, num_crops=crops)
    loader = DALIClipLoader(samples, batch_size=2, device="cpu", **common)
    (batch,) = list(loader)
    video = batch["video"]
    assert video.shape == (2, clips * crops, 4, 3, 32, 32)
    reference = VideoClipDataset(samples, **common)
    for b in range(2):
        want = reference[b]["video"]  # (V, T, 3, 32, 32), PyAV
        distances = (video[b][:, None] - want[None]).abs().mean(dim=(2, 3, 4, 5))  # (V dali, V pyav)
        assert torch.equal(distances.argmin(dim=1), torch.arange(clips * crops))
        assert float(distances.diagonal().max()) < 0.15  # normalised units; other views are 0.35 or more away
    with pytest.raises(ValueError, match="for evaluation"):
        DALIClipLoader(samples, batch_size=1, device="cpu", **{**common, "train": True})


def test_train_and_evaluate_run_on_the_dali_pipeline(tmp_path):
    """--decoder dali end to end on a VP9 set: training batches and multi-view evaluation come from
    DALIClipLoader, and the evaluation equals the same checkpoint evaluated through PyAV up to the
    decoders' pixel differences (at most one of the 8 videos may change its prediction)."""
    import json

    from m2clip_fast.data.synthetic import make_dataset
    from m2clip_fast.evaluate import evaluate, parse_args as eval_args
    from m2clip_fast.train import main as train_main

    data = tmp_path / "data"
    make_dataset(data, codec="vp9", per_class=1, val_per_class=1, frames=12, size=32, seed=4)
    out = tmp_path / "run"
    assert train_main(["--preset", "demo", "--train-list", str(data / "train.txt"), "--val-list",
                       str(data / "val.txt"), "--class-names", str(data / "classes.txt"), "--output-dir", str(out),
                       "--batch-size", "4", "--workers", "1", "--no-progress", "--device", "cpu", "--epochs", "1",
                       "--decoder", "dali", "--set", "num_frames=4", "train.stride=2", "train.views='2x3'"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["num_samples"] == 8 and record["decode_stats"]["decoder"] == "dali"
    common = ["--checkpoint", str(out / "checkpoints" / "last.pt"), "--val-list", str(data / "val.txt"),
              "--views", "2x3", "--device", "cpu", "--workers", "1"]
    with_dali = evaluate(eval_args(common + ["--decoder", "dali"]))
    with_pyav = evaluate(eval_args(common + ["--decoder", "pyav"]))
    assert with_dali["num_samples"] == with_pyav["num_samples"] == 8
    assert (with_dali["decode_stats"]["decoder"], with_pyav["decode_stats"]["decoder"]) == ("dali", "pyav")
    for head in ("vc", "text", "fused"):
        assert abs(with_dali[f"top1_{head}"] - with_pyav[f"top1_{head}"]) <= 100 / 8


def test_dali_loader_replaces_like_the_dataset_when_n_is_a_multiple_of_the_step(vp9, tmp_path):
    """With 7919 samples (the replacement step) the DALI loader's chain was i, i, i, ...: a bad file was
    'replaced' by itself until max_attempts ran out. It now walks VideoClipDataset's chain."""
    from m2clip_fast.data import VideoClipDataset

    _, paths = vp9
    bad = str(write_broken_video(tmp_path / "bad.webm", "garbage"))
    samples = [(bad, 0)] + [(str(paths[0]), 1)] * 7918
    loader = DALIClipLoader(samples, batch_size=1, num_frames=2, size=16, train=False, device="cpu")
    reference = VideoClipDataset(samples, num_frames=2, size=16, train=False)
    item = loader._source._one(0)
    assert int(item[-1]) == reference.replacement(0, 1) != 0
    assert [s["index"] for s in loader._source.pending_skipped] == [0]
    assert [loader.replacement(0, k) for k in range(4)] == [reference.replacement(0, k) for k in range(4)]


def write_undecodable_vp9(src, dst):
    """A copy of the VP9 WebM ``src`` whose container and packet index stay intact (so the loader's
    up-front check passes) but whose every frame payload starts with a zero byte: not a VP9 frame
    marker, so DALI's decoder fails ("Failed to send packet to decoder")."""
    data = bytearray(open(src, "rb").read())
    with av.open(str(src)) as container:
        packets = [(p.pos, bytes(p)) for p in container.demux(video=0) if p.size]
    for pos, payload in packets:
        offset = data.find(payload, pos)
        assert offset >= 0
        data[offset] = 0
    open(dst, "wb").write(bytes(data))
    return str(dst)


def test_dali_loader_replaces_a_file_that_fails_inside_the_batch(vp9, tmp_path):
    """A file DALI cannot decode although its index is fine used to raise out of the loader and stop
    the run. Now it is reported with a reason, replaced along the chain, the batch stays full, the
    good samples' frames are exactly those decoded without the bad file, and the pipeline keeps
    working for the next epoch."""
    from m2clip_fast.data.decode import get_index

    _, paths = vp9
    bad = write_undecodable_vp9(paths[0], tmp_path / "undecodable.webm")
    assert get_index(bad).num_frames == 30  # passes the loader's up-front check
    good = [str(p) for p in paths[1:]]
    samples = [(good[0], 0), (good[1], 1), (bad, 2), (good[2], 3)]
    common = dict(num_frames=4, size=32, train=False, sampling="uniform", device="cpu")

    # the crafted file really makes DALI's batch decoding raise (a plain two-sample pipeline)
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def probe():
        return fn.decoders.video(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1),
                                 frames=fn.external_source(name="frames", dtype=types.INT32, ndim=1), device="cpu")

    pipe = probe()
    pipe.build()
    pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in (good[0], bad)])
    pipe.feed_input("frames", [np.array([0, 9], dtype=np.int32)] * 2)
    with pytest.raises(RuntimeError, match="Failed to send packet to decoder"):
        pipe.run()
    del pipe

    loader = DALIClipLoader(samples, batch_size=2, **common)
    reference = DALIClipLoader([(p, 0) for p in good], batch_size=1, **common)
    want = {p: b["video"][0] for p, b in zip(good, reference)}
    first = None
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [b["video"].shape for b in batches] == [(2, 1, 4, 3, 32, 32)] * 2
        assert [b["index"].tolist() for b in batches] == [[0, 1], [loader.replacement(2, 1), 3]] == [[0, 1], [3, 3]]
        assert batches[0]["skipped"] == []
        (skip,) = batches[1]["skipped"]
        assert skip["path"] == bad and skip["index"] == 2
        assert skip["reason"].startswith("DALI decode failed (") and "Failed to send packet" in skip["reason"]
        for b in batches:
            for video, j in zip(b["video"], b["index"].tolist()):
                assert torch.equal(video, want[samples[j][0]])
        if first is not None:
            assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, batches))
        first = batches

    # training: the same full batch shape, the bad file skipped once per epoch
    train = DALIClipLoader(samples, batch_size=4, num_frames=4, size=32, train=True, device="cpu", seed=3)
    (batch,) = list(train)
    assert batch["video"].shape == (4, 4, 3, 32, 32)
    assert [s["path"] for s in batch["skipped"]] == [bad]
    assert bad not in [samples[j][0] for j in batch["index"].tolist()]


# ------------------------------------------------------------------ devices, the feeder thread, the fallback
def _feeders():
    return [t for t in threading.enumerate() if t.name == "dali-feeder" and t.is_alive()]


def test_the_extras_install_dali_for_torchs_cuda():
    """setup.py's [dali] and [test] extras name the DALI wheel built for torch's CUDA major version."""
    import re

    from m2clip_fast.data.dali import dali_package

    assert dali_package("13.0") == "nvidia-dali-cuda130" and dali_package("12.8") == "nvidia-dali-cuda120"
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    named = re.findall(r'"(nvidia-dali-cuda\d+)', setup)
    assert len(named) == 2 and set(named) == {dali_package()}, named


def test_pipelines_run_on_the_current_device():
    """DALI's device_id is torch's current CUDA device (None without CUDA: a CPU-only pipeline), or the GPU
    asked for; read back from real (unbuilt) DALI pipelines, whose device_id is what the constructor got."""
    from nvidia.dali import fn, types

    from m2clip_fast.data.dali import current_device_id, define_pipeline, pipeline_device_id

    expected = torch.cuda.current_device() if torch.cuda.is_available() else None
    assert current_device_id() == expected
    assert pipeline_device_id("mixed") == expected and pipeline_device_id("mixed", 3) == 3
    assert pipeline_device_id("cpu", 3) is None

    def graph():
        return fn.external_source(name="x", dtype=types.UINT8, ndim=1)

    assert define_pipeline(graph, batch_size=1, num_threads=1, device="cpu").device_id is None
    assert define_pipeline(graph, batch_size=1, num_threads=1, device="mixed").device_id == expected
    assert define_pipeline(graph, batch_size=1, num_threads=1, device="mixed", device_id=1).device_id == 1


def test_a_gpu_pipeline_that_cannot_start_says_so(vp9):
    """Without CUDA a GPU pipeline fails for real: DALIStartError (one line, naming the GPU), not a file's
    fault."""
    from m2clip_fast.data.dali import DALIStartError, PIPELINES, gpu_start_problem, read_bytes

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: DALI's GPU pipelines start")
    _, paths = vp9
    with pytest.raises(DALIStartError) as info:
        PIPELINES.run("mixed", read_bytes(paths[0]), np.array([0], np.int32), paths[0], device_id=0)
    assert str(info.value).startswith("DALI cannot start on GPU 0: ") and "\n" not in str(info.value)
    assert "CUDA" in info.value.reason
    assert not isinstance(info.value, VideoDecodeError)
    assert gpu_start_problem(read_bytes(paths[0]), 0) == info.value.reason


def test_auto_falls_back_to_pyav_where_dali_cannot_start_on_the_gpu(tmp_path):
    """--decoder auto on a CUDA device where DALI's GPU pipeline does not start (here: no CUDA at all, which
    DALI itself reports) picks PyAV and says why; --decoder dali stops with that reason in one line."""
    from m2clip_fast.data.dali import DALIStartError
    from m2clip_fast.data.decode import get_index
    from m2clip_fast.data.frames import probe_clip
    from m2clip_fast.data.loader import DecodeTally, DecoderChoice, resolve_decoder

    probe = tmp_path / "probe.mp4"  # what the GPU is asked to decode: a real H.264 clip
    probe_clip().tofile(probe)
    assert (get_index(probe).codec, get_index(probe).num_frames) == ("h264", 2)
    assert decode_all_frames(probe).shape == (2, 64, 64, 3)

    cpu = torch.device("cpu")
    assert resolve_decoder("auto", cpu) == DecoderChoice("pyav")
    assert resolve_decoder("dali", cpu) == DecoderChoice("dali")
    assert resolve_decoder("pyav", torch.device("cuda", 0)) == DecoderChoice("pyav")
    gpu = torch.device("cuda", 0)
    choice = resolve_decoder("auto", gpu)
    if torch.cuda.is_available():
        pytest.skip(f"this machine has CUDA: auto chose {choice.description}")
    assert choice.name == "pyav" and choice.fallback.startswith("DALI cannot start on GPU 0 (")
    assert "CUDA" in choice.fallback
    assert choice.description == f"pyav (fallback: {choice.fallback})"
    assert choice.notice.startswith("--decoder auto: DALI cannot start on GPU 0") and "\n" not in choice.notice
    assert DecodeTally(choice.description).record()["decoder"] == choice.description
    with pytest.raises(DALIStartError, match=r"^DALI cannot start on GPU 0: .*CUDA.*--decoder pyav") as info:
        resolve_decoder("dali", gpu)
    assert "\n" not in str(info.value)
    # distributed: one rank that falls back makes every rank use PyAV
    other_rank = DecoderChoice("pyav", "DALI cannot start on GPU 1 (no NVDEC)")
    assert resolve_decoder("dali", cpu, gather=lambda mine: [mine, other_rank]) == other_rank


def _timed_pass(loader, consumer_s):
    """(total seconds, seconds the consumer waited in next() after the first batch, batches, ready counts)."""
    it = iter(loader)
    start = time.perf_counter()
    next(it)
    waited, batches, ready = 0.0, 1, []
    while True:
        time.sleep(consumer_s)
        ready.append(loader._feeder().ready())
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - t
        batches += 1
    return time.perf_counter() - start, waited, batches, ready[:-1]


def test_decoding_overlaps_a_slow_consumer(vp9):
    """The pipeline runs on the feeder thread, 2 batches ahead: a consumer that takes s per batch (s above the
    decode time d measured here first) waits for almost nothing and finds the next batch ready, and the pass
    takes about n * s, not n * (d + s) as with decoding in turn."""
    _, paths = vp9
    samples = [(str(p), i) for i, p in enumerate(paths)] * 4  # 16 videos
    loader = DALIClipLoader(samples, batch_size=2, num_frames=8, size=32, train=True, sampling="uniform",
                            device="cpu", num_threads=1, seed=2)
    list(loader)  # warm: pipeline, index cache
    decode_total, _, n, _ = _timed_pass(loader, 0.0)  # the consumer takes no time: the producer's pace
    d = decode_total / n
    s = max(3 * d, 0.05)
    total, waited, n2, ready = _timed_pass(loader, s)
    assert n2 == n == 8
    assert waited < 0.5 * (n - 1) * d, (waited, d)  # in turn it would wait d per batch
    assert sum(r >= 1 for r in ready) >= len(ready) - 1, ready  # the next batch was there when asked
    assert total < n * s + 0.5 * n * d + 0.05, (total, n, s, d)  # in turn: n * (s + d)
    assert not _wait_for(lambda: _feeders(), 2.0)


def _wait_for(condition, timeout):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_the_feeder_stops_when_the_consumer_does(vp9, tmp_path):
    """Leaving a pass early ends its feeder thread; a new pass starts afresh from its first batch; an error on
    the feeder (every video of a batch bad) reaches the consumer as the one-line error naming the file."""
    _, paths = vp9
    samples = [(str(p), i) for i, p in enumerate(paths)]
    loader = DALIClipLoader(samples, batch_size=1, num_frames=2, size=16, train=False, device="cpu")
    full = [b["index"].tolist() for b in loader]
    for batch in loader:
        break
    del batch
    assert _wait_for(lambda: not _feeders(), 5.0)
    assert [b["index"].tolist() for b in loader] == full

    bad = [(str(write_broken_video(tmp_path / f"b{i}.webm", "garbage", seed=i)), 0) for i in range(2)]
    broken = DALIClipLoader(samples[:1] + bad, batch_size=1, num_frames=2, size=16, train=False, device="cpu",
                            max_attempts=2)
    got = []
    with pytest.raises(DatasetError) as info:
        for batch in broken:
            got.append(batch["index"].tolist())
    assert got == [[0]]  # the good batch came first
    assert "b1.webm" in str(info.value) and "\n" not in str(info.value)
    assert _wait_for(lambda: not _feeders(), 5.0)


@pytest.mark.slow  # a fresh interpreter importing torch and open_clip: 5-25 s on 2 busy cores
def test_the_interpreter_exits_with_a_pass_left_running(vp9, tmp_path):
    """A script that takes one batch and exits, its feeder thread still decoding, ends at once."""
    import os
    import subprocess
    import sys

    import m2clip_fast

    _, paths = vp9
    script = tmp_path / "exit.py"
    script.write_text(
        "from m2clip_fast.data.dali_loader import DALIClipLoader\n"
        f"loader = DALIClipLoader([(p, 0) for p in {[str(p) for p in paths]!r}] * 8, batch_size=1, num_frames=2,"
        " size=16, train=False, device='cpu')\n"
        "it = iter(loader)\nnext(it)\nprint('took one batch', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(m2clip_fast.__file__).parents[1])}  # this checkout's package
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "took one batch" in done.stdout
