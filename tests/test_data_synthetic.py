import numpy as np
import pytest

from m2clip_fast.data import decode_all_frames, read_class_names, num_frames, read_list_file
from m2clip_fast.data.synthetic import CLASSES, dataset_meta, main, make_dataset, read_meta, render_clip, write_video


def foreground(clip):
    """bool (T, H, W): pixels away from the per-pixel temporal median (the static background)."""
    clip = clip.astype(np.int16)
    return np.abs(clip - np.median(clip, axis=0)).sum(-1) > 60


def circular_centroid(mask, axis, size):
    """Centroid of a bool (H, W) mask along ``axis`` on a circle of ``size`` pixels (wrap-around)."""
    coords = np.nonzero(mask)[axis]
    return np.angle(np.exp(2j * np.pi * coords / size).mean()) * size / (2 * np.pi)


@pytest.mark.parametrize("name, axis, sign", [("moving_left", 1, -1), ("moving_right", 1, 1),
                                              ("moving_up", 0, -1), ("moving_down", 0, 1)])
def test_translation_classes_move_the_right_way(name, axis, sign):
    for seed in range(4):
        clip = render_clip(CLASSES.index(name), np.random.default_rng(seed), frames=20, size=64)
        mask = foreground(clip)
        steps = [circular_centroid(mask[t + 1], axis, 64) - circular_centroid(mask[t], axis, 64) for t in range(19)]
        steps = (np.asarray(steps) + 32) % 64 - 32  # unwrap across the border
        # the bar moves 1.5-2.5 pixels per frame; the median-background mask loses the pixels the
        # bar covers most of the time, which shrinks the measured step, but never its direction
        assert 0.3 < sign * np.median(steps) < 3.0, (name, seed, np.round(steps, 1))
        assert (sign * steps > 0).mean() > 0.7


def edge_pixels(clip):
    """int (T,): pixels with a strong spatial gradient, i.e. the bar's outline and stripes (the
    background is smooth); it scales with the bar's size."""
    c = clip.astype(np.int16)
    gx = np.abs(np.diff(c, axis=2)).sum(-1)[:, :-1, :]
    gy = np.abs(np.diff(c, axis=1)).sum(-1)[:, :, :-1]
    return ((gx + gy) > 60).sum((1, 2))


def test_growing_and_shrinking_change_the_size():
    for seed in range(4):
        grow = edge_pixels(render_clip(CLASSES.index("growing"), np.random.default_rng(seed)))
        shrink = edge_pixels(render_clip(CLASSES.index("shrinking"), np.random.default_rng(seed)))
        assert grow[-1] > 1.3 * grow[0] and shrink[0] > 1.3 * shrink[-1], (grow, shrink)


def test_single_frame_statistics_do_not_reveal_the_class():
    # the bar's size (edge pixels) and the frame's mean brightness in one random frame: about the
    # same distribution for every class
    sizes, brightness = {}, {}
    for label, name in enumerate(CLASSES):
        edges, means = [], []
        for seed in range(10):
            clip = render_clip(label, np.random.default_rng([seed, label]), frames=20, size=64)
            edges.append(edge_pixels(clip[seed % 20:seed % 20 + 1])[0])
            means.append(clip[seed % 20].mean())
        sizes[name], brightness[name] = np.mean(edges), np.mean(means)
    assert max(sizes.values()) / min(sizes.values()) < 1.6, sizes
    assert max(brightness.values()) - min(brightness.values()) < 30, brightness


def test_cli_writes_a_deterministic_decodable_dataset(tmp_path, capsys):
    args = ["--per-class", "2", "--val-per-class", "1", "--frames", "12", "--size", "32", "--gop", "6"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert "wrote 24 videos" in capsys.readouterr().out
    main(["--out", str(tmp_path / "b"), *args])
    main(["--out", str(tmp_path / "c"), "--seed", "1", *args])
    assert read_class_names(tmp_path / "a" / "classes.txt") == list(CLASSES)
    train = read_list_file(tmp_path / "a" / "train.txt")
    val = read_list_file(tmp_path / "a" / "val.txt")
    assert len(train) == 16 and len(val) == 8
    assert [label for _, label in train] == [i for i in range(8) for _ in range(2)]
    for path, label in train + val:
        assert f"/{CLASSES[label]}/" in path and path.endswith(".mp4")
        assert num_frames(path) == 12
    first_a = decode_all_frames(train[5][0]).float()
    assert first_a.shape == (12, 32, 32, 3)
    # the rendered frames are bit-identical for a seed, but libx264 does not reproduce its
    # bitstream exactly across processes (the first encodes of a process vary by a few levels)
    same_seed = decode_all_frames(train[5][0].replace("/a/", "/b/")).float()
    other_seed = decode_all_frames(train[5][0].replace("/a/", "/c/")).float()
    assert (first_a - same_seed).abs().mean() < 1.0
    assert (first_a - other_seed).abs().mean() > 10.0


def test_render_is_deterministic():
    a = render_clip(4, np.random.default_rng([0, 0, 4, 1]))
    assert np.array_equal(a, render_clip(4, np.random.default_rng([0, 0, 4, 1])))
    assert not np.array_equal(a, render_clip(4, np.random.default_rng([0, 0, 4, 2])))


@pytest.mark.parametrize("codec, ext", [("vp9", ".webm"), ("mpeg4", ".avi")])
def test_cli_other_codecs(tmp_path, codec, ext):
    main(["--out", str(tmp_path), "--codec", codec, "--per-class", "1", "--val-per-class", "0", "--frames", "8"])
    train = read_list_file(tmp_path / "train.txt")
    assert len(train) == 8 and all(p.endswith(ext) for p, _ in train)
    assert decode_all_frames(train[0][0]).shape == (8, 64, 64, 3)


def test_write_video_validates_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="unknown codec"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 32, 32, 3), np.uint8), codec="av1")


@pytest.mark.parametrize("option, value, message", [
    ("--frames", "0", "argument --frames: must be >= 1, got 0"),
    ("--size", "-4", "argument --size: must be >= 2, got -4"),
    ("--size", "31", "argument --size: must be even"),
    ("--per-class", "0", "argument --per-class: must be >= 1, got 0"),
    ("--val-per-class", "-1", "argument --val-per-class: must be >= 0, got -1"),
    ("--gop", "x", "argument --gop: expected an integer, got 'x'"),
])
def test_cli_refuses_bad_counts_and_sizes_as_usage_errors(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "set"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
    with pytest.raises(ValueError, match="frames must be >= 1"):  # the API says so too, before writing anything
        make_dataset(tmp_path / "set", frames=0)
    assert not (tmp_path / "set").exists()


def test_a_new_set_replaces_the_earlier_one_and_val_0_writes_no_val_list(tmp_path, capsys):
    tiny = ["--frames", "2", "--size", "16"]
    assert main(["--out", str(tmp_path), "--per-class", "2", "--val-per-class", "1", *tiny]) == 0
    assert read_meta(tmp_path) == dataset_meta(per_class=2, val_per_class=1, frames=2, size=16)
    assert len(list((tmp_path / "videos").rglob("*.mp4"))) == 24
    (tmp_path / "videos" / "growing" / "notes.txt").write_text("not the generator's")
    capsys.readouterr()
    assert main(["--out", str(tmp_path), "--per-class", "1", "--val-per-class", "0", "--seed", "4", *tiny]) == 0
    assert "(no validation set)" in capsys.readouterr().out
    assert not (tmp_path / "val.txt").exists()  # not a list with one empty line: train would call it unusable
    assert sorted(p.name for p in (tmp_path / "videos").rglob("*.mp4")) == sorted(
        f"train_{name}_0000.mp4" for name in CLASSES)  # no stray videos of the earlier, larger set
    assert (tmp_path / "videos" / "growing" / "notes.txt").exists()  # files with other names are left alone
    assert read_meta(tmp_path) == dataset_meta(per_class=1, val_per_class=0, frames=2, size=16, seed=4)
    assert len(read_list_file(tmp_path / "train.txt")) == 8
    (tmp_path / "meta.json").write_text('{"generator": "someone else"}')
    assert read_meta(tmp_path) is None
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "0 writes no val.txt" in capsys.readouterr().out
