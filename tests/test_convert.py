"""Official M²-CLIP Adapter2 checkpoints → TEDAdapter (m2clip_fast.convert)."""
import sys
from pathlib import Path

import pytest
import torch

from m2clip_fast.adapters import TEDAdapter
from m2clip_fast.convert import convert_official_adapter, to_official_adapter

# The official-style module (official names and eager math: gather, permutes, Conv1d / Conv3d)
# lives with the benchmark baselines; it is written independently of TEDAdapter's forward.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import OfficialStyleTEDAdapter  # noqa: E402


def official(dim=48, r=12, frames=4, grid=(5, 5), seed=0):
    module = OfficialStyleTEDAdapter(dim, r, frames, grid if grid[0] != grid[1] else None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # the official init zeroes convs and biases: randomise all
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[1] ** -0.5 if p.dim() == 2 else 0.5))
    return module


@pytest.mark.parametrize("frames,grid", [(4, (5, 5)), (1, (3, 3)), (3, (4, 6))])
def test_converted_state_computes_the_official_function(frames, grid):
    theirs = official(frames=frames, grid=grid)
    state = theirs.state_dict()
    assert state["offset_adapter.conv.weight"].shape == (12, 1, 1, 3, 3)
    assert state["conv.weight"].shape == (12, 1, 3)
    ours = TEDAdapter(48, 12, frames, grid=grid)
    ours.load_state_dict(convert_official_adapter(state), strict=True)
    x = torch.randn(2 * frames, 1 + grid[0] * grid[1], 48)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert (want - x)[:, 0].abs().max() > 0 and (want - x)[:, 1:].abs().max() > 0  # both branches contribute


def test_prefix_selects_one_adapter_of_a_full_checkpoint():
    state = {f"visual.transformer.resblocks.11.adapter_pre_attn.{k}": v for k, v in official().state_dict().items()}
    state["visual.proj"] = torch.zeros(3)
    out = convert_official_adapter(state, prefix="visual.transformer.resblocks.11.adapter_pre_attn.")
    assert set(out) == set(TEDAdapter(48, 12).state_dict())
    with pytest.raises(KeyError, match="prefix"):
        convert_official_adapter(state, prefix="text.")


def test_round_trip_through_official_keys():
    ours = TEDAdapter(48, 12, 4)
    back = convert_official_adapter(to_official_adapter(ours.state_dict()))
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value)


def test_missing_and_unexpected_keys_are_named():
    state = official().state_dict()
    del state["offset_adapter.fc2.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['offset_adapter.fc2.bias'\], unexpected \['extra.weight'\]"):
        convert_official_adapter(state)


@pytest.mark.parametrize("key,shape", [
    ("fc2.weight", (47, 12)),
    ("offset_adapter.conv.weight", (12, 1, 3, 3)),  # already 2-D: not an official Conv3d
    ("conv.weight", (12, 1, 4)),
])
def test_bad_shapes_are_refused(key, shape):
    state = official().state_dict()
    state[key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") if key != "conv.weight" else "odd"):
        convert_official_adapter(state)


def test_non_tensor_value_is_refused():
    state = official().state_dict()
    state["fc1.bias"] = [0.0] * 12
    with pytest.raises(TypeError, match="fc1.bias"):
        convert_official_adapter(state)
