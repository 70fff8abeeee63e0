import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2clip_fast.data.transforms import (
    check_scale_range,
    crop_offsets,
    normalize,
    resize_short_side,
    test_transform as make_test_views,
    train_transform,
)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # OpenAI CLIP
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def reference_normalize(thwc_uint8):
    return (thwc_uint8.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def ramp_clip(t, h, w):
    """uint8 (t, h, w, 3) whose every pixel differs: position- and frame-dependent values."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = [torch.stack([(x * 3 + k) % 256, (y * 5 + 2 * k) % 256, (x + y + 7 * k) % 256], -1) for k in range(t)]
    return torch.stack(frames).to(torch.uint8)


def test_crop_offsets_hand_computed():
    # 320x240 resized to short side 224 -> long 298, margin 74
    assert crop_offsets(298, 224, 1) == [37]
    assert crop_offsets(298, 224, 3) == [0, 37, 74]
    assert crop_offsets(298, 224, 4) == [0, 18, 37, 74]
    with pytest.raises(ValueError, match="num_crops"):
        crop_offsets(298, 224, 2)
    with pytest.raises(ValueError, match="larger"):
        crop_offsets(200, 224, 1)


def test_resize_short_side_shapes_and_values():
    clip = torch.full((2, 240, 320, 3), 77, dtype=torch.uint8)
    out = resize_short_side(clip, 224)
    assert out.shape == (2, 3, 224, 298) and out.dtype == torch.uint8
    assert torch.all(out == 77)
    assert resize_short_side(torch.zeros(1, 320, 240, 3, dtype=torch.uint8), 112).shape == (1, 3, 149, 112)
    # the uint8 fast path agrees with a float reference within rounding
    clip = ramp_clip(2, 60, 80)
    ref = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=(30, 40), mode="bilinear", antialias=True,
                        align_corners=False)
    assert (resize_short_side(clip, 30).float() - ref).abs().max() <= 1.0


def test_normalize_matches_clip_statistics():
    clip = ramp_clip(3, 8, 8)
    assert torch.allclose(normalize(clip.permute(0, 3, 1, 2)), reference_normalize(clip), atol=1e-5)


@pytest.mark.parametrize("num_crops, offsets", [(1, [9]), (3, [0, 9, 18]), (4, [0, 4, 9, 18])])
def test_test_views_landscape(num_crops, offsets):
    clip = ramp_clip(2, 32, 50)  # short side already 32: no resize, so crops are exact
    out = make_test_views(clip, size=32, num_crops=num_crops)
    assert out.shape == (num_crops, 2, 3, 32, 32) and out.dtype == torch.float32
    for view, x0 in zip(out, offsets):
        assert torch.allclose(view, reference_normalize(clip[:, :, x0:x0 + 32]), atol=1e-5)


def test_test_views_portrait_and_one_crop_centres_both_axes():
    clip = ramp_clip(1, 50, 32)
    out = make_test_views(clip, size=32, num_crops=3)
    for view, y0 in zip(out, [0, 9, 18]):
        assert torch.allclose(view, reference_normalize(clip[:, y0:y0 + 32]), atol=1e-5)
    resized = make_test_views(ramp_clip(1, 64, 100), size=32, num_crops=1)
    assert resized.shape == (1, 1, 3, 32, 32)


def _match_crop(out, clip, size):
    """(top, left, flipped) of the crop of ``clip`` that ``out`` is, or None."""
    ref = reference_normalize(clip)
    h, w = clip.shape[1:3]
    for top in range(h - size + 1):
        for left in range(w - size + 1):
            crop = ref[..., top:top + size, left:left + size]
            for flipped in (False, True):
                if torch.allclose(out, crop.flip(-1) if flipped else crop, atol=1e-5):
                    return top, left, flipped
    return None


def test_train_transform_same_crop_for_all_frames_and_flip_flag():
    clip = ramp_clip(3, 20, 24)
    seen_flip, seen_offsets = set(), set()
    for seed in range(24):
        out = train_transform(clip, size=20, rng=np.random.default_rng(seed), scale_range=(1.0, 1.0))
        assert out.shape == (3, 3, 20, 20) and out.dtype == torch.float32
        match = _match_crop(out, clip, 20)  # one crop/flip explains all three frames at once
        assert match is not None
        seen_offsets.add(match[1])
        seen_flip.add(match[2])
        no_flip = train_transform(clip, size=20, rng=np.random.default_rng(seed), scale_range=(1.0, 1.0), flip=False)
        assert _match_crop(no_flip, clip, 20)[2] is False
    assert seen_flip == {False, True} and len(seen_offsets) > 2


def test_train_transform_jitter_range_and_determinism():
    clip = torch.zeros(2, 40, 60, 3, dtype=torch.uint8)
    a = train_transform(clip, size=32, rng=np.random.default_rng(3), scale_range=(1.0, 1.25))
    b = train_transform(clip, size=32, rng=np.random.default_rng(3), scale_range=(1.0, 1.25))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    with pytest.raises(ValueError, match="scale_range"):
        train_transform(clip, size=32, rng=np.random.default_rng(0), scale_range=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        train_transform(torch.zeros(2, 3, 40, 60, dtype=torch.uint8), size=32, rng=np.random.default_rng(0))


def test_the_float_resize_path_matches_the_uint8_one():
    """Devices other than the CPU resize in float32 (their antialiased kernels take no uint8): the same
    resize as the CPU's uint8 kernel, within one level of rounding."""
    from m2clip_fast.data.transforms import resize_via_float

    clip = ramp_clip(3, 45, 70).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    for size in [(32, 49), (60, 93)]:  # down and up
        uint8 = F.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
        via_float = resize_via_float(clip, size)
        assert via_float.dtype == torch.uint8 and via_float.shape == uint8.shape
        assert (via_float.int() - uint8.int()).abs().max() <= 1


def test_transforms_run_on_the_clips_device():
    """CUDA frames (DALI's GPU decoder) meet constants on their own device: traced on fake CUDA tensors, where
    any CPU tensor taking part (the normalisation constants once were) is an error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from m2clip_fast.data.transforms import views_from_clips

    with FakeTensorMode(allow_non_fake_inputs=False):
        clip = torch.empty((4, 40, 60, 3), dtype=torch.uint8, device="cuda")
        out = train_transform(clip, size=32, rng=np.random.default_rng(0))
        views = views_from_clips([clip, clip], size=32, num_crops=3)
        pixels = normalize(torch.empty((2, 3, 8, 8), dtype=torch.uint8, device="cuda"))
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("cuda", torch.float32, (4, 3, 32, 32))
    assert (views.device.type, tuple(views.shape)) == ("cuda", (6, 4, 3, 32, 32))
    assert (pixels.device.type, pixels.dtype) == ("cuda", torch.float32)


def test_short_side_jitter_draws_every_size_in_range_then_one_crop():
    """The official K400 recipe (scale 1.0-1.15 of the crop): the short side is one of the integers
    round(size * 1.0) .. round(size * 1.15), then a random crop; replayed from the same generator."""
    clip = ramp_clip(2, 40, 60)
    size, shorts = 32, set()
    for seed in range(60):
        out = train_transform(clip, size=size, rng=np.random.default_rng(seed), scale_range=(1.0, 1.15), flip=False)
        rng = np.random.default_rng(seed)
        short = int(rng.integers(32, 38))  # round(32 * 1.0) = 32 .. round(32 * 1.15) = round(36.8) = 37
        shorts.add(short)
        resized = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=(short, 60 * short // 40), mode="bilinear",
                                antialias=True, align_corners=False)
        top = int(rng.integers(0, resized.shape[-2] - size + 1))
        left = int(rng.integers(0, resized.shape[-1] - size + 1))
        expected = resized[..., top:top + size, left:left + size]
        got = out * STD + MEAN  # back to [0, 1]
        assert torch.allclose(got * 255, expected, atol=1.01)  # uint8 rounding of the resize
    assert shorts == set(range(32, 38))


def reference_rrc_box(h, w, rng, scale):
    """The official (SlowFast) _get_param_spatial_crop, written out: (top, left, crop h, crop w)."""
    for _ in range(10):
        area = rng.uniform(*scale) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ch, cw = h, w
    if w / h < 3 / 4:
        ch = int(round(w / (3 / 4)))
    elif w / h > 4 / 3:
        cw = int(round(h * (4 / 3)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize("h, w, scale", [(40, 60, (0.08, 1.0)), (48, 48, (0.5, 0.5)), (20, 80, (1.0, 1.0))])
def test_random_resized_crop_is_the_official_box_resized(h, w, scale):
    clip = ramp_clip(3, h, w)
    fractions = []
    for seed in range(25):
        out = train_transform(clip, size=24, rng=np.random.default_rng(seed), resize="random_resized_crop",
                              scale_range=scale, flip=False)
        top, left, ch, cw = reference_rrc_box(h, w, np.random.default_rng(seed), scale)
        crop = clip[:, top:top + ch, left:left + cw].permute(0, 3, 1, 2).float()
        expected = F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
        assert out.shape == (3, 3, 24, 24)
        assert torch.allclose((out * STD + MEAN) * 255, expected, atol=1.01)  # one box for all frames
        fractions.append(ch * cw / (h * w))
    if scale == (1.0, 1.0):  # a 1:4 frame never fits a full-area crop of aspect <= 4/3: the clamped centre
        assert set(fractions) == {round(20 * 4 / 3) * 20 / (20 * 80)}
    else:
        assert all(scale[0] * 0.9 <= f <= scale[1] * 1.05 for f in fractions)


def test_scale_range_is_checked_per_resize_mode():
    assert check_scale_range("short_side_jitter", (1.0, 1.15)) is None
    assert check_scale_range("random_resized_crop", (0.08, 1.0)) is None
    assert "1 <= lo <= hi" in check_scale_range("short_side_jitter", (0.08, 1.0))
    assert "0 < lo <= hi <= 1" in check_scale_range("random_resized_crop", (1.0, 1.15))
    assert check_scale_range("random_resized_crop", (0.5,)) is not None
    assert check_scale_range("bicubic", (1.0, 1.0)) is not None
