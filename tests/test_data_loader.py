import numpy as np
import pytest
import torch

from m2clip_fast.data import DatasetError, VideoClipDataset, build_loader, collate, decode_all_frames
from m2clip_fast.data.robust import replacement_index, replacement_stride
from m2clip_fast.data.sampling import sample_indices
from m2clip_fast.data.synthetic import textured_frames, write_broken_video, write_video
from m2clip_fast.data.transforms import test_transform as make_test_views
from m2clip_fast.data.transforms import train_transform
from m2clip_fast.errors import UsageError

T, SIZE = 4, 32


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    out = []
    for i in range(7):
        frames = textured_frames(20 + 3 * i, 40, 56, seed=10 + i)
        out.append((str(write_video(root / f"v{i}.mp4", frames, codec="h264", gop=6)), i % 3))
    # indices 7..11 are bad, one of each kind
    out.append((str(write_broken_video(root / "trunc.mp4", "truncated")), 0))
    out.append((str(write_broken_video(root / "garbage.mp4", "garbage")), 1))
    out.append((str(write_broken_video(root / "zero.avi", "zero_frames")), 2))
    out.append((str(root / "missing.mp4"), 0))
    out.append((str(write_broken_video(root / "empty.webm", "empty")), 1))
    return out


def make(samples, **kw):
    args = dict(num_frames=T, sampling="dense", stride=2, train=True, size=SIZE, seed=5, flip=True)
    args.update(kw)
    return VideoClipDataset(samples, **args)


def expected_train_item(samples, ds, i, k=0):
    """Recompute an item independently: whole-video decode + the documented seeding."""
    path, label = samples[ds.replacement(i, k)]
    rng = np.random.default_rng([ds.seed, ds.epoch, i, k])
    full = decode_all_frames(path)
    idx = sample_indices(ds.sampling, len(full), T, train=True, stride=ds.stride, rng=rng)[0]
    return train_transform(full[idx], size=SIZE, rng=rng, scale_range=ds.scale_range, flip=ds.flip,
                           resize=ds.resize, rand_augment=ds.rand_augment), label


SSV2_AUGMENT = dict(sampling="uniform", flip=False, resize="random_resized_crop", scale_range=(0.08, 1.0),
                    rand_augment="rand-m7-n4-mstd0.5-inc1")  # the ssv2_b16_8f preset's training augmentation


@pytest.mark.parametrize("augment", [{}, SSV2_AUGMENT], ids=["default", "ssv2"])
def test_train_item_matches_independent_recomputation(samples, augment):
    ds = make(samples, **augment)
    for i in (0, 3, 6):
        item = ds[i]
        video, label = expected_train_item(samples, ds, i)
        assert item["video"].shape == (T, 3, SIZE, SIZE) and item["video"].dtype == torch.float32
        assert torch.equal(item["video"], video)
        assert (item["label"], item["index"], item["skipped"]) == (label, i, [])


def test_epochs_change_randomness_reproducibly(samples):
    ds = make(samples, sampling="uniform")
    a0 = ds[2]["video"]
    ds.set_epoch(1)
    a1 = ds[2]["video"]
    assert not torch.equal(a0, a1)
    ds.set_epoch(0)
    assert torch.equal(ds[2]["video"], a0)
    assert torch.equal(make(samples, sampling="uniform")[2]["video"], a0)


def test_bad_videos_are_replaced_deterministically_and_reported(samples):
    n = len(samples)
    ds = make(samples)
    reasons = {7: "truncated", 8: "cannot open container", 9: "zero frames", 10: "file not found", 11: "empty file"}
    for i, reason in reasons.items():
        item = ds[i]
        # walk the documented replacement chain independently
        chain = [(i + k * replacement_stride(n)) % n for k in range(n)]
        first_good = next(k for k, j in enumerate(chain) if j < 7)
        assert item["index"] == chain[first_good]
        assert [s["index"] for s in item["skipped"]] == chain[:first_good]
        assert reason in item["skipped"][0]["reason"] and item["skipped"][0]["path"] == samples[i][0]
        video, label = expected_train_item(samples, ds, i, first_good)
        assert torch.equal(item["video"], video) and item["label"] == label
        assert ds[i]["index"] == item["index"]  # same replacement every time


def test_all_attempts_failing_raises_a_clear_error(samples):
    """An item whose attempts all fail takes a readable item's place in its batch; a batch without any
    readable item is an error naming the files tried."""
    ds = make(samples[6:], max_attempts=3)  # sample 0 (v6.mp4) is the only readable one
    assert ds[1]["video"] is None and len(ds[1]["skipped"]) == 3
    batch = collate([ds[1], ds[0], ds[2]])
    assert batch["index"].tolist() == [0, 0, 0] and torch.equal(batch["video"][0], ds[0]["video"])
    assert len(batch["skipped"]) == 6
    with pytest.raises(DatasetError, match=r"every item of a batch of 2 failed.*trunc\.mp4: [a-z ]*truncated"):
        collate([ds[1], ds[2]])


@pytest.mark.parametrize("n", [37, 40, 80, 7920])
def test_runs_of_bad_files_are_replaced_at_every_size(samples, n, tmp_path):
    """n where the old fixed step 7919 is ±1 mod n (its chain walked along neighbours): 10 consecutive
    unreadable files, every one of them gets a readable replacement within its attempts."""
    good = [s for s in samples[:7]]
    bad_path = write_broken_video(tmp_path / "bad.mp4", "garbage")
    first_bad = n // 2
    listing = [good[j % 7] for j in range(n)]
    for j in range(first_bad, first_bad + 10):
        listing[j] = (str(bad_path), 0)
    ds = make(listing)
    for i in range(first_bad, first_bad + 10):
        item = ds[i]
        assert item["video"] is not None and not first_bad <= item["index"] < first_bad + 10
        assert len(item["skipped"]) <= 2 and item["skipped"][0]["index"] == i


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 37, 40, 48, 60, 80, 120, 240, 7919, 7920, 7921])
def test_replacement_chain_visits_distinct_samples(n):
    chain = [replacement_index(3 % n, k, n) for k in range(n)]
    assert sorted(chain) == list(range(n))
    if n > 5:  # never a neighbour of the item, nor of the previous attempt
        assert all(abs(a - b) % n not in (1, n - 1) for a, b in zip(chain, chain[1:]))


def test_zero_frames_or_stride_are_usage_errors(samples):
    for kw, named in ((dict(num_frames=0), "num_frames"), (dict(stride=0), "stride")):
        with pytest.raises(UsageError, match=f"{named} must be an integer >= 1, got 0"):
            make(samples, **kw)


def test_test_mode_views(samples):
    ds = make(samples, train=False, num_clips=2, num_crops=3, sampling="dense")
    item = ds[4]
    assert item["video"].shape == (6, T, 3, SIZE, SIZE)
    full = decode_all_frames(samples[4][0])
    idx = sample_indices("dense", len(full), T, train=False, stride=2, num_clips=2)
    expected = torch.cat([make_test_views(full[torch.as_tensor(c)], size=SIZE, num_crops=3) for c in idx])
    assert torch.equal(item["video"], expected)


def test_augment_settings_are_checked_when_built(samples):
    with pytest.raises(UsageError, match=r"resize 'random_resized_crop' with scale_range \(1.0, 1.15\): expected "
                                         r"two numbers 0 < lo <= hi <= 1"):
        make(samples, resize="random_resized_crop")
    with pytest.raises(UsageError, match="unknown section 'q3'"):
        make(samples, rand_augment="rand-m7-q3")


def test_constructor_validation(samples):
    with pytest.raises(DatasetError, match="at least one sample"):
        make([])
    with pytest.raises(ValueError, match="one clip and one crop"):
        make(samples, num_clips=2)
    with pytest.raises(ValueError, match="unknown sampling"):
        make(samples, sampling="random")


def test_collate_concatenates_skipped(samples):
    ds = make(samples)
    batch = collate([ds[0], ds[7], ds[9]])
    assert batch["video"].shape == (3, T, 3, SIZE, SIZE)
    assert batch["label"].dtype == torch.int64 and batch["index"][0] == 0
    assert len(batch["skipped"]) == len(ds[7]["skipped"]) + len(ds[9]["skipped"]) >= 2


def run_epochs(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append([(b["index"].tolist(), b["video"], len(b["skipped"])) for b in loader])
    return out


@pytest.mark.parametrize("augment", [{}, SSV2_AUGMENT], ids=["default", "ssv2"])
def test_dataloader_with_two_workers_matches_single_process(samples, augment):
    ds = make(samples, **augment)
    serial = run_epochs(build_loader(ds, batch_size=4, workers=0, shuffle=True, seed=3), [0, 1])
    parallel_loader = build_loader(make(samples, **augment), batch_size=4, workers=2, shuffle=True, seed=3)
    assert parallel_loader.persistent_workers and parallel_loader.num_workers == 2
    parallel = run_epochs(parallel_loader, [0, 1])
    for epoch_s, epoch_p in zip(serial, parallel):
        assert len(epoch_s) == 3  # 12 samples, batches of 4
        for (idx_s, vid_s, sk_s), (idx_p, vid_p, sk_p) in zip(epoch_s, epoch_p):
            assert idx_s == idx_p and sk_s == sk_p and torch.equal(vid_s, vid_p)
    assert sum(b[2] for b in serial[0]) >= 5  # every bad file was met and reported
    assert [b[0] for b in serial[0]] != [b[0] for b in serial[1]]  # reshuffled per epoch


def test_unexpected_errors_from_odd_files_are_skipped_not_raised(samples, tmp_path, monkeypatch):
    """Whatever a file makes decoding or transforming raise (not only VideoDecodeError) must end as a
    counted skip with a reason: an unknown codec used to escape as AttributeError and stop the run."""
    unknown = tmp_path / "unknown_codec.avi"
    unknown.write_bytes(write_video(tmp_path / "v.avi", textured_frames(8, 32, 32), codec="mpeg4")
                        .read_bytes().replace(b"FMP4", b"ZZZZ"))
    data = [(str(unknown), 0)] + samples[:2]
    item = make(data)[0]
    assert item["index"] != 0 and item["video"].shape == (T, 3, SIZE, SIZE)
    assert [(s["index"], s["path"]) for s in item["skipped"]] == [(0, str(unknown))]
    assert "no decoder" in item["skipped"][0]["reason"]

    # errors raised past the decoder (a MemoryError on a huge frame, a ValueError from a transform)
    import m2clip_fast.data.loader as loader_module

    calls = []

    def transform_failing_once(frames, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("cannot allocate 4 GiB")
        return train_transform(frames, **kw)

    monkeypatch.setattr(loader_module, "train_transform", transform_failing_once)
    item = make(samples[:3])[1]
    assert item["skipped"] == [{"path": samples[1][0], "reason": "MemoryError: cannot allocate 4 GiB", "index": 1}]
    assert item["index"] != 1 and len(calls) == 2
