"""The QuickGELU MLP in SiLU form (m2clip_fast.mlp) against open_clip's own MLP and float64, and the chunked
vision-tower calls of inference (M2CLIP.encode_frames' clips_per_call, M2CLIP.inference_clips_per_call; the
calls side by side: tests/test_cpu_workers.py)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is not imported by torch.nn.utils)
from open_clip.transformer import QuickGELU
from torch import nn

from m2clip_fast import create_model
from m2clip_fast.mlp import SiLUFormMLP, set_mlp_form
from m2clip_fast.model import CPU_INFERENCE_TOKENS
from m2clip_fast.tolerance import assert_within_reference_error


def open_clip_mlp(width: int, hidden: int, seed: int) -> nn.Sequential:
    """open_clip's ResidualAttentionBlock.mlp, random weights of CLIP's scale."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(seed)
    mlp = ResidualAttentionBlock(width, 1, mlp_ratio=hidden / width, act_layer=QuickGELU).mlp
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return mlp


def run(mlp: nn.Module, x: torch.Tensor, grad: bool):
    """{"out", "x.grad", "<param>.grad"} of one forward (and backward of a fixed random cotangent)."""
    x = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = mlp(x)
    result = {"out": out.detach()}
    if grad:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(cotangent.to(out.dtype))
        result["x.grad"] = x.grad
        result.update({f"{n}.grad": p.grad for n, p in mlp.named_parameters()})
        mlp.zero_grad(set_to_none=True)
    return result


# (leading shape of x, width, hidden): one row, odd row counts, batch-first and sequence-first 3-D inputs
SHAPES = [((1,), 16, 64), ((7,), 24, 96), ((3, 197), 32, 128), ((50, 2), 48, 80), ((2, 5, 17), 64, 256)]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("lead,width,hidden", SHAPES)
def test_silu_form_within_open_clip_error_of_float64(lead, width, hidden, grad):
    reference = open_clip_mlp(width, hidden, seed=hidden)
    ours = copy.deepcopy(reference)
    assert set_mlp_form(ours, True) == 1 and type(ours) is SiLUFormMLP
    x = torch.randn(*lead, width, generator=torch.Generator().manual_seed(width))
    exact = run(copy.deepcopy(reference).double(), x.double(), grad)
    assert_within_reference_error(run(ours, x, grad), run(reference, x, grad), exact,
                                  what=f"SiLU-form MLP, x {tuple(x.shape)}")


def test_silu_form_bf16_autocast_within_open_clip_error_of_float64():
    reference = open_clip_mlp(64, 256, seed=1)
    ours = copy.deepcopy(reference)
    set_mlp_form(ours, True)
    x = torch.randn(4, 33, 64, generator=torch.Generator().manual_seed(2))
    exact = run(copy.deepcopy(reference).double(), x.double(), grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(ours, x, grad=True), run(reference, x, grad=True)
    assert got["out"].dtype == want["out"].dtype == torch.bfloat16
    assert_within_reference_error(got, want, exact, dtype=torch.bfloat16, what="SiLU-form MLP under bf16 autocast")


class SiLUCalls(torch.overrides.TorchFunctionMode):
    """Records the ``inplace`` flag of every F.silu call made under it."""

    def __init__(self):
        super().__init__()
        self.in_place = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.silu:
            self.in_place.append(bool(kwargs.get("inplace", args[1] if len(args) > 1 else False)))
        return func(*args, **kwargs)


def test_activation_runs_in_place_only_without_autograd_and_gives_the_same_bits():
    mlp = open_clip_mlp(32, 128, seed=3)
    set_mlp_form(mlp, True)
    x = torch.randn(5, 9, 32)
    with SiLUCalls() as calls, torch.no_grad():
        fast = mlp(x)
    with SiLUCalls() as grad_calls:
        with_grad = mlp(x)
    assert calls.in_place == [True] and grad_calls.in_place == [False]
    assert torch.equal(fast, with_grad.detach())  # the same kernel, once in place


def test_changed_or_hooked_children_run_as_plain_sequential():
    """A hook, a wrapped linear, pruning, a slice or an appended module must take effect, as on open_clip's MLP."""
    x = torch.randn(4, 7, 32)

    def fresh():
        mlp = open_clip_mlp(32, 128, seed=4)
        assert set_mlp_form(mlp, True) == 1
        return mlp

    mlp, seen = fresh(), []
    mlp.c_fc.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(mlp(x), nn.Sequential.forward(mlp, x), rtol=0, atol=0)
    assert seen and seen[0][-1] == 128

    class Doubled(nn.Module):  # a LoRA-style wrapper around the original linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return 2 * self.inner(h)

    mlp = fresh()
    mlp.c_fc = Doubled(mlp.c_fc)
    torch.testing.assert_close(mlp(x), nn.Sequential.forward(mlp, x), rtol=0, atol=0)

    mlp = fresh()
    torch.nn.utils.prune.l1_unstructured(mlp.c_proj, "weight", amount=0.5)
    torch.testing.assert_close(mlp(x), nn.Sequential.forward(mlp, x), rtol=0, atol=0)

    mlp = fresh()
    head = mlp[:2]  # c_fc, gelu
    torch.testing.assert_close(head(x), mlp.gelu(mlp.c_fc(x)), rtol=0, atol=0)
    mlp.append(nn.LayerNorm(32))
    torch.testing.assert_close(mlp(x), nn.Sequential.forward(mlp, x), rtol=0, atol=0)
    assert set_mlp_form(mlp, False) == 1 and type(mlp) is nn.Sequential  # reverts whatever its children are


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_silu_form_traces():
    mlp = open_clip_mlp(16, 64, seed=5)
    set_mlp_form(mlp, True)
    x = torch.randn(3, 16)
    traced = torch.jit.trace(mlp, x)  # checks the trace against eager under grad
    with torch.no_grad():
        torch.testing.assert_close(traced(x), mlp(x), rtol=0, atol=0)


def test_set_mlp_form_swaps_every_quick_gelu_mlp_both_ways_with_the_same_state_dict():
    model = create_model("tiny", pretrained=None, class_names=["a", "b"], fused=False)
    blocks = [*model.clip.visual.transformer.resblocks, *model.clip.transformer.resblocks]
    if model.cmlm_block is not None:
        blocks.append(model.cmlm_block)
    assert all(type(b.mlp) is nn.Sequential for b in blocks)  # fused=False: open_clip's own MLP
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_mlp_form(model, True) == len(blocks)
    assert all(type(b.mlp) is SiLUFormMLP for b in blocks)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert set_mlp_form(model, False) == len(blocks)
    assert all(type(b.mlp) is nn.Sequential for b in blocks)
    assert type(create_model("tiny", pretrained=None, class_names=["a", "b"]).clip.visual.transformer
                .resblocks[0].mlp) is SiLUFormMLP  # the default, fused=True


def test_gelu_mlps_are_left_alone():
    from open_clip.transformer import ResidualAttentionBlock

    block = ResidualAttentionBlock(32, 2, act_layer=nn.GELU)
    assert set_mlp_form(block, True) == 0 and type(block.mlp) is nn.Sequential


# ---------------------------------------------------------------------------------- chunked inference
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny", pretrained=None, class_names=["a", "b", "c"]).eval()


def test_inference_clips_per_call_by_hand(tiny, monkeypatch):
    tokens = tiny.num_frames * (1 + tiny.grid[0] * tiny.grid[1])  # tiny: 32 px / 4 px patches = 8 x 8 grid
    assert tiny.grid == (8, 8)
    monkeypatch.setattr(tiny, "cpu_inference_workers", 1)  # calls one after another (tests/test_cpu_workers.py)
    assert tiny.inference_clips_per_call(torch.device("cpu")) == CPU_INFERENCE_TOKENS // tokens
    assert tiny.inference_clips_per_call(torch.device("cuda")) is None  # one call: GPUs want large batches
    k400 = create_model("k400_b16_8f", pretrained=None)
    k400.cpu_inference_workers = 1
    assert k400.inference_clips_per_call(torch.device("cpu")) == 2  # 4096 // (8 frames x 197 tokens)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5])  # 5 clips: 5 is one call, the control
def test_chunked_encode_frames_matches_one_call(tiny, chunk):
    video = torch.randn(5, tiny.num_frames, 3, 32, 32, generator=torch.Generator().manual_seed(chunk))
    calls = []
    hook = tiny.clip.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            whole = tiny.encode_frames(video)
            calls.clear()
            parts = tiny.encode_frames(video, clips_per_call=chunk)
    finally:
        hook.remove()
    t = tiny.num_frames
    assert calls == [t * len(c) for c in video.split(chunk)]  # clips, not frames, are split
    with torch.no_grad():  # clips never mix: the chunks differ from one call by GEMM blocking (rounding) only
        exact = copy.deepcopy(tiny).double().encode_frames(video.double())
    names = ("frames", "pooled")
    assert_within_reference_error(dict(zip(names, parts)), dict(zip(names, whole)), dict(zip(names, exact)),
                                  what=f"encode_frames in chunks of {chunk}")


def test_predict_on_the_cpu_calls_the_tower_in_chunks(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "cpu_inference_tokens", 2 * tiny.num_frames * 65)  # 2 clips per call
    monkeypatch.setattr(tiny, "cpu_inference_workers", 1)  # one after another, in order
    calls = []
    frames = tiny.num_frames
    hook = tiny.clip.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0] // frames))
    try:
        video = torch.randn(5, tiny.num_frames, 3, 32, 32)
        chunked = tiny.predict(video)
        monkeypatch.setattr(tiny, "cpu_inference_tokens", None)  # one call
        calls_chunked, calls[:] = list(calls), []
        whole = tiny.predict(video)
    finally:
        hook.remove()
    assert calls_chunked == [2, 2, 1] and calls == [5]
    with torch.no_grad():
        exact = copy.deepcopy(tiny).double().predict(video.double())
    assert_within_reference_error(chunked, whole, exact, what="predict in chunks")


def test_clips_per_call_below_one_is_refused(tiny):
    with pytest.raises(ValueError, match="clips_per_call"):
        tiny.encode_frames(torch.zeros(2, tiny.num_frames, 3, 32, 32), clips_per_call=0)


def test_a_bad_video_is_reported_before_chunking(tiny):
    with pytest.raises(ValueError, match="rank 0"):
        tiny.encode_frames(torch.zeros(()), clips_per_call=1)
    with pytest.raises(ValueError, match="frames but the model was built for"):
        tiny.encode_frames(torch.zeros(3, tiny.num_frames + 1, 3, 32, 32), clips_per_call=1)


def test_encode_video_chunks_only_without_autograd(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "cpu_inference_tokens", tiny.num_frames * 65)  # 1 clip per call
    calls = []
    hook = tiny.clip.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        video = torch.randn(3, tiny.num_frames, 3, 32, 32)
        with torch.no_grad():
            tiny.encode_video(video)
        inference, calls[:] = list(calls), []
        tiny.encode_video(video)
    finally:
        hook.remove()
    assert inference == [tiny.num_frames] * 3 and calls == [3 * tiny.num_frames]
