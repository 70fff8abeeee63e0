"""The fused CPU adapter is deterministic and keeps no state between calls: an inference pass (no_grad) before a
training step must not change that step's gradients by a single bit, or a run that evaluates mid-training
diverges from one that resumes from a checkpoint."""
import copy

import pytest
import torch

from m2clip_fast.fused import FusedTEDAdapter, extension_available


@pytest.mark.skipif(not extension_available(), reason="m2clip_fast._C is not built")
@pytest.mark.parametrize("seed", range(8))
def test_inference_pass_does_not_leak_into_the_next_training_step(seed):
    torch.manual_seed(seed)
    a = FusedTEDAdapter(64, 32, num_frames=4, backend="cpu")
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b = copy.deepcopy(a)
    x, other = torch.randn(8, 65, 64), torch.randn(8, 65, 64)
    with torch.no_grad():
        a(other)

    def step(module):
        xx = x.clone().requires_grad_()
        module.zero_grad()
        module(xx).square().sum().backward()
        return {"out_grad_x": xx.grad, **{n: p.grad for n, p in module.named_parameters()}}

    ga, gb = step(a), step(b)
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
