"""Reference adapters against naive loop implementations written from the method's definition."""
import pytest
import torch

from m2clip_fast.adapters import TEDAdapter, TemporalAdapter, TextAdapter
from m2clip_fast.tolerance import assert_within_reference_error


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def naive_ted(adapter, x, frames, h, w, dtype=torch.float64):
    """Token-by-token loops in ``dtype``: E = up_e(Σ_k conv_e[k]·down_e(x_{t+k-1}) + b), D on the patch grid."""
    x = x.to(dtype)
    sd = {k: v.to(dtype) for k, v in adapter.state_dict().items()}
    bt, length, c = x.shape
    b = bt // frames
    out = x.clone()
    lin = lambda name, v: v @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]
    for clip in range(b):
        rows = [clip * frames + t for t in range(frames)]
        z_e = [lin("down_e", x[r]) for r in rows]  # each (L, r)
        for t in range(frames):
            acc = sd["conv_e.bias"].expand_as(z_e[0]).clone()
            for k in range(3):
                s = t + k - 1
                if 0 <= s < frames:
                    acc = acc + sd["conv_e.weight"][:, 0, k] * z_e[s]
            out[rows[t]] += lin("up_e", acc)
        for t in range(frames):
            prev = x[rows[t - 1], 1:] if t > 0 else x[rows[t], 1:]
            z = lin("down_d", x[rows[t], 1:] - prev).reshape(h, w, -1)
            acc = sd["conv_d.bias"].expand_as(z).clone()
            for i in range(h):
                for j in range(w):
                    for di in range(3):
                        for dj in range(3):
                            ii, jj = i + di - 1, j + dj - 1
                            if 0 <= ii < h and 0 <= jj < w:
                                acc[i, j] += sd["conv_d.weight"][:, 0, di, dj] * z[ii, jj]
            out[rows[t], 1:] += lin("up_d", acc.reshape(h * w, -1))
    return out


@pytest.mark.parametrize("frames,grid", [(1, (2, 2)), (3, (3, 3)), (4, (2, 3))])
def test_ted_matches_naive_loops(frames, grid):
    h, w = grid
    adapter = randomise(TEDAdapter(12, 5, num_frames=frames, grid=grid if h != w else None))
    x = torch.randn(2 * frames, 1 + h * w, 12)
    # the adapter (fp32) within 2 × the fp32 loops' own error vs the loops in float64 (m2clip_fast/tolerance.py)
    assert_within_reference_error(adapter(x), naive_ted(adapter, x, frames, h, w, torch.float32),
                                  naive_ted(adapter, x, frames, h, w))


def test_fresh_adapter_is_exact_identity_and_input_untouched():
    adapter = TEDAdapter(16, 8, num_frames=4)
    x = torch.randn(8, 10, 16)
    before = x.clone()
    y = adapter(x)
    assert torch.equal(y, x)
    assert torch.equal(x, before)


def test_state_dict_contract():
    shapes = {k: tuple(v.shape) for k, v in TEDAdapter(20, 6).state_dict().items()}
    assert shapes == {
        "down_e.weight": (6, 20), "down_e.bias": (6,), "conv_e.weight": (6, 1, 3), "conv_e.bias": (6,),
        "up_e.weight": (20, 6), "up_e.bias": (20,), "down_d.weight": (6, 20), "down_d.bias": (6,),
        "conv_d.weight": (6, 1, 3, 3), "conv_d.bias": (6,), "up_d.weight": (20, 6), "up_d.bias": (20,),
    }


def test_branch_ablations_sum_to_full_adapter():
    full = randomise(TEDAdapter(12, 4, num_frames=2))
    e_only = TEDAdapter(12, 4, num_frames=2, difference=False)
    d_only = TEDAdapter(12, 4, num_frames=2, enhance=False)
    e_only.load_state_dict({k: v for k, v in full.state_dict().items() if "_e." in k})
    d_only.load_state_dict({k: v for k, v in full.state_dict().items() if "_d." in k})
    x = torch.randn(4, 5, 12)
    # the same fp32 products, only a few additions reordered: the default fp32 bound (1.3e-6 relative) holds
    torch.testing.assert_close(full(x), e_only(x) + d_only(x) - x)
    # the class token gets no D update
    torch.testing.assert_close(d_only(x)[:, 0], x[:, 0])


def test_residual_argument_and_frame_override():
    adapter = randomise(TEDAdapter(8, 4, num_frames=2))
    x, base = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    # one fp32 update, added to two residuals and subtracted again: a few roundings of O(1) values
    torch.testing.assert_close(adapter(x, num_frames=3, residual=base) - base, adapter(x, num_frames=3) - x)


def test_gradients_flow_without_inplace_errors():
    adapter = randomise(TEDAdapter(8, 4, num_frames=2))
    x = torch.randn(4, 5, 8, requires_grad=True)
    adapter(x).pow(2).sum().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


@pytest.mark.parametrize("make,match", [
    (lambda: torch.randn(4, 5), "rank 2"),
    (lambda: torch.randint(0, 3, (4, 5, 8)), "floating-point"),
    (lambda: torch.randn(3, 5, 8), "not a multiple of num_frames=2"),
    (lambda: torch.randn(4, 7, 8), "do not form a square grid; pass grid"),
])
def test_bad_input_errors_name_the_problem(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TEDAdapter(8, 4, num_frames=2)(make())


def test_grid_mismatch_error():
    with pytest.raises(ValueError, match="grid 2x3 = 6 patches, but the tokens have 8"):
        TEDAdapter(8, 4, num_frames=1, grid=(2, 3))(torch.randn(1, 9, 8))


def test_temporal_adapter_matches_loops_and_starts_as_identity():
    ta = TemporalAdapter(6, 3, num_frames=4)
    x = torch.randn(8, 6)
    assert torch.equal(ta(x), x)
    randomise(ta)
    sd = ta.state_dict()
    z = x @ sd["down.weight"].t() + sd["down.bias"]
    expected = x.clone()
    for b in range(2):
        for t in range(4):
            acc = sd["conv.bias"].clone()
            for k in range(3):
                s = t + k - 1
                if 0 <= s < 4:
                    acc += sd["conv.weight"][:, 0, k] * z[b * 4 + s]
            expected[b * 4 + t] += acc @ sd["up.weight"].t() + sd["up.bias"]
    # 6- and 3-term dots of O(1) values in fp32 on both sides: the default fp32 bound (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(ta(x), expected)


def test_text_adapter_formula():
    ta = randomise(TextAdapter(4, 3))
    x = torch.randn(2, 4)
    sd = ta.state_dict()
    hidden = x @ sd["down.weight"].t() + sd["down.bias"]
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / 2 ** 0.5))
    # 4- and 3-term dots and one erf in fp32 on both sides: the default fp32 bound
    torch.testing.assert_close(ta(x), x + gelu @ sd["up.weight"].t() + sd["up.bias"])
