import numpy as np
import pytest

from m2clip_fast.data.sampling import dense_indices, sample_indices, uniform_indices


def rng(seed=0):
    return np.random.default_rng(seed)


def test_dense_test_mode_hand_computed():
    # 100 frames, 8 x stride 4: span 29, last start that fits 71
    assert dense_indices(100, 8, 4, train=False).tolist() == [[35, 39, 43, 47, 51, 55, 59, 63]]
    three = dense_indices(100, 8, 4, train=False, num_clips=3)
    assert three[:, 0].tolist() == [0, 36, 71]  # round(71 / 2) = 36 (banker's rounding of 35.5)
    assert three[2].tolist() == [71, 75, 79, 83, 87, 91, 95, 99]


def test_dense_training_range_and_determinism():
    starts = set()
    for seed in range(200):
        idx = dense_indices(50, 4, 5, train=True, rng=rng(seed))
        assert idx.shape == (1, 4) and idx.dtype == np.int64
        assert np.all(np.diff(idx[0]) == 5) and 0 <= idx.min() and idx.max() <= 49
        starts.add(int(idx[0, 0]))
        assert np.array_equal(idx, dense_indices(50, 4, 5, train=True, rng=rng(seed)))
    assert starts == set(range(0, 35))  # every start 0..34 (= 50 - 16) occurs


def test_dense_short_videos_clamp_or_loop():
    assert dense_indices(10, 4, 4, train=False).tolist() == [[0, 4, 8, 9]]
    assert dense_indices(10, 4, 4, train=True, rng=rng()).tolist() == [[0, 4, 8, 9]]
    from m2clip_fast.data.sampling import _fit

    assert _fit(np.array([0, 4, 8, 12]), 10, "loop").tolist() == [0, 4, 8, 2]
    assert dense_indices(1, 8, 8, train=False, num_clips=2).tolist() == [[0] * 8, [0] * 8]


def test_uniform_test_mode_hand_computed():
    # 80 frames, 8 segments of 10: centres 5, 15, ..., 75
    assert uniform_indices(80, 8, train=False).tolist() == [list(range(5, 80, 10))]
    two = uniform_indices(80, 8, train=False, num_clips=2)
    assert two.tolist() == [list(range(2, 80, 10)), list(range(7, 80, 10))]  # offsets 2.5, 7.5
    # 10 frames in 4 segments of 2.5: centres floor(1.25 + 2.5 i)
    assert uniform_indices(10, 4, train=False).tolist() == [[1, 3, 6, 8]]


def test_uniform_training_one_frame_per_segment():
    for seed in range(100):
        idx = uniform_indices(80, 8, train=True, rng=rng(seed))[0]
        assert np.array_equal(idx // 10, np.arange(8))
    first = {int(uniform_indices(80, 8, train=True, rng=rng(s))[0, 0]) for s in range(300)}
    assert first == set(range(10))


def test_uniform_short_and_single_frame_videos():
    for n in (1, 2, 3, 7):
        for train in (True, False):
            idx = uniform_indices(n, 8, train=train, rng=rng(n))
            assert idx.min() >= 0 and idx.max() <= n - 1
            assert np.all(np.diff(idx[0]) >= 0)
    assert uniform_indices(3, 6, train=False).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_zero_frames_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="0 frames"):
        dense_indices(0, 8, 2, train=False)
    with pytest.raises(ValueError, match="0 frames"):
        uniform_indices(0, 8, train=True, rng=rng())
    with pytest.raises(TypeError, match="Generator"):
        dense_indices(10, 2, 1, train=True)
    with pytest.raises(ValueError, match="one clip"):
        uniform_indices(10, 2, train=True, num_clips=2, rng=rng())
    with pytest.raises(ValueError, match="unknown sampling"):
        sample_indices("random", 10, 2, train=False)


def test_sample_indices_dispatches():
    assert np.array_equal(sample_indices("dense", 100, 8, train=False, stride=4), dense_indices(100, 8, 4, train=False))
    assert np.array_equal(sample_indices("uniform", 80, 8, train=False, num_clips=2),
                          uniform_indices(80, 8, train=False, num_clips=2))
