"""RandAugment on clips: timm's own single-image result on every frame, one draw per clip."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from m2clip_fast.data.randaugment import check_rand_augment, clip_rand_augment
from m2clip_fast.data.transforms import train_transform
from m2clip_fast.errors import UsageError

SSV2 = "rand-m7-n4-mstd0.5-inc1"  # the official scripts/train_ssv2_clip_vit_b16.sh --auto_augment
# the official video_dataset/rand_augment.py's _RAND_INCREASING_TRANSFORMS (what inc1 selects there)
OFFICIAL_INCREASING_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]


def random_clip(t, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


def timm_frame(frame: torch.Tensor, seed: int, config: str = SSV2) -> np.ndarray:
    """timm's RandAugment of one frame from the RNG state ``seed``, with the official hparams
    (video_dataset/transform.py create_random_augment: bicubic, translate_const 45% of the short side)."""
    h, w = frame.shape[:2]
    transform = rand_augment_transform(config, {"translate_const": int(min(h, w) * 0.45),
                                                "interpolation": Image.BICUBIC})
    random.seed(seed)
    np.random.seed(seed)
    return np.asarray(transform(Image.fromarray(frame.numpy())))


def test_timm_reads_the_ssv2_string_as_the_official_copy_does():
    t = rand_augment_transform(SSV2, {"translate_const": 100})
    assert t.num_layers == 4 and t.choice_weights is None  # n4, ops drawn with replacement
    assert [op.name for op in t.ops] == OFFICIAL_INCREASING_OPS  # inc1
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in t.ops} == {(7, 0.5, 0.5)}  # m7, mstd0.5


def test_each_frame_is_timms_single_image_result_with_the_shared_seed():
    clip = random_clip(5, 36, 44, seed=1)
    for seed in (0, 7, 123456789):
        out = clip_rand_augment(clip, SSV2, seed)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        for i in range(len(clip)):
            np.testing.assert_array_equal(out[i].numpy(), timm_frame(clip[i], seed))


def test_identical_frames_stay_identical_and_the_ops_change_them():
    frame = random_clip(1, 30, 40, seed=2)
    clip = frame.repeat(6, 1, 1, 1)
    changed = 0
    for seed in range(12):
        out = clip_rand_augment(clip, SSV2, seed)
        assert all(torch.equal(out[0], out[i]) for i in range(1, 6)), seed
        changed += not torch.equal(out[0], frame[0])
    assert changed >= 10  # 4 ops at p=0.5 each: a seed changes nothing with probability 1/16


def test_different_clips_get_different_ops_and_the_callers_rng_is_kept():
    clip = random_clip(3, 30, 40, seed=3)
    random.seed(99)
    np.random.seed(99)
    before = (random.random(), np.random.random_sample())
    random.seed(99)
    np.random.seed(99)
    outs = [clip_rand_augment(clip, SSV2, seed) for seed in range(10)]
    assert (random.random(), np.random.random_sample()) == before  # global streams untouched
    distinct = {out.numpy().tobytes() for out in outs}
    assert len(distinct) >= 8


def test_train_transform_draws_the_augment_seed_from_its_generator():
    clip = random_clip(4, 48, 64, seed=4)
    a = train_transform(clip, size=32, rng=np.random.default_rng(5), rand_augment=SSV2, flip=False,
                        resize="random_resized_crop", scale_range=(0.08, 1.0))
    b = train_transform(clip, size=32, rng=np.random.default_rng(5), rand_augment=SSV2, flip=False,
                        resize="random_resized_crop", scale_range=(0.08, 1.0))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    # the first draw of the item's generator seeds the augment; resizing then uses the draws after it
    rng = np.random.default_rng(5)
    augmented = clip_rand_augment(clip, SSV2, int(rng.integers(0, 2 ** 32)))
    expected = train_transform(augmented, size=32, rng=rng, flip=False, resize="random_resized_crop",
                               scale_range=(0.08, 1.0))
    assert torch.equal(a, expected)


@pytest.mark.parametrize("bad", ["", "rand", "auto-m7", "randm7-n4", "rand-m7-x3", "rand-mfoo", "rand-m7-m8",
                                 "rand-inc2", "rand-mstd0.5.1", "rand-tnope", "rand-n", "rand-m7--n4"])
def test_bad_strings_are_one_line_errors_naming_them(bad):
    if bad == "rand":
        check_rand_augment(bad)  # timm's defaults (m10, n2): valid
        return
    with pytest.raises(UsageError) as err:
        check_rand_augment(bad)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_a_wrong_clip_is_refused():
    with pytest.raises(ValueError, match=r"uint8 clip of shape \(T, H, W, 3\)"):
        clip_rand_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), SSV2, 0)
