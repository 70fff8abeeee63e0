"""Attention backends against PyTorch's own nn.MultiheadAttention (the independent reference), an fp64 copy of
it, and each other: masks, cross-attention, layouts, low precision, gradients, the swap on a real open_clip
model and on M2CLIP, state_dict compatibility and the xformers errors."""
import copy
import importlib.util
import io
import sys
import types

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import m2clip_fast.attention as A
import m2clip_fast.model as M
from m2clip_fast.attention import MultiheadAttention, get_attention_backend, set_attention_backend
from m2clip_fast.tolerance import assert_within_reference_error

FAST = ("sdpa", "math")  # the backends that run on CPU


def causal(n, dtype=torch.float32):
    """open_clip's text mask: -inf above the diagonal, 0 elsewhere (L, L)."""
    return torch.full((n, n), float("-inf"), dtype=dtype).triu_(1)


def randomise(module, seed=0, scale=0.2):
    """Random weights *and* biases (nn.MultiheadAttention initialises its biases to zero, which would hide
    a bias bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def pair(embed=64, heads=4, seed=0, **kwargs):
    """(reference nn.MultiheadAttention, an independent swapped copy of it), both in eval mode."""
    kwargs.setdefault("batch_first", True)
    ref = randomise(nn.MultiheadAttention(embed, heads, **kwargs), seed).eval()
    ours = copy.deepcopy(ref)
    assert set_attention_backend(ours, "sdpa") == 1
    return ref, ours


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def self_inputs(b, l, e):
    x = randn(b, l, e)
    return x, x, x


def cross_inputs(b, l, s, e, kdim=None):
    y = randn(b, s, kdim or e, seed=2)
    return randn(b, l, e), y, y


def _additive(mask):
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


# name: (module kwargs, (q, k, v), forward kwargs). E=64, H=4 unless the module kwargs say otherwise.
padding = torch.zeros(3, 12, dtype=torch.bool)  # (B, S): True = a padding key
padding[0, 7:] = True
padding[2, 10:] = True
causal_bool = torch.ones(12, 12, dtype=torch.bool).triu(1)
CASES = {
    "vision_no_mask": ({}, self_inputs(3, 17, 64), {}),
    "text_causal_float": ({}, self_inputs(3, 12, 64), {"attn_mask": causal(12)}),
    "causal_bool": ({}, self_inputs(3, 12, 64), {"attn_mask": causal_bool}),
    "causal_hint": ({}, self_inputs(3, 12, 64), {"attn_mask": causal(12), "is_causal": True}),
    "additive_mask": ({}, self_inputs(3, 12, 64), {"attn_mask": causal(12).T + randn(12, 12, seed=3)}),
    "per_head_mask": ({}, self_inputs(3, 12, 64), {"attn_mask": randn(12, 12, 12, seed=3)}),
    "padding_and_causal": ({}, self_inputs(3, 12, 64),
                           {"attn_mask": causal(12), "key_padding_mask": _additive(padding)}),
    "padding_and_causal_bool": ({}, self_inputs(3, 12, 64), {"attn_mask": causal_bool, "key_padding_mask": padding}),
    "cross_shared_kv": ({}, cross_inputs(3, 5, 9, 64), {}),
    "cross_distinct_kv": ({}, (randn(3, 5, 64), randn(3, 9, 64, seed=2), randn(3, 9, 64, seed=3)), {}),
    "cross_kdim_vdim": ({"embed": 48, "kdim": 32, "vdim": 32}, cross_inputs(3, 5, 9, 48, kdim=32), {}),
    "odd_head_dim": ({"embed": 21, "heads": 3}, self_inputs(2, 11, 21), {"attn_mask": causal(11)}),
    "odd_head_dim_cross": ({"embed": 15, "heads": 3}, cross_inputs(2, 3, 13, 15), {}),
    "batch_1": ({}, self_inputs(1, 9, 64), {"attn_mask": causal(9)}),
    "batch_1_cross": ({}, cross_inputs(1, 1, 7, 64), {}),
    "seq_first": ({"batch_first": False}, self_inputs(6, 3, 64), {"attn_mask": causal(6)}),
    "seq_first_cross": ({"batch_first": False}, (randn(5, 3, 64),) + (randn(8, 3, 64, seed=4),) * 2, {}),
    "unbatched": ({}, (randn(7, 64),) * 3, {"attn_mask": causal(7)}),
    "no_bias": ({"bias": False}, self_inputs(2, 10, 64), {"attn_mask": causal(10)}),
}


def _double(t):
    return t.double() if torch.is_tensor(t) and t.is_floating_point() else t


def assert_like_mha(got, ref, q, k, v, what="", **kwargs):
    """got, an output of ours for (q, k, v, kwargs), within the error model of m2clip_fast/tolerance.py: 2 × the fp32
    error of nn.MultiheadAttention ``ref`` itself against a float64 copy of it (+ 1 ulp)."""
    expected = ref(q, k, v, need_weights=False, **kwargs)[0]
    exact = copy.deepcopy(ref).double()(*map(_double, (q, k, v)), need_weights=False,
                                        **{n: _double(t) for n, t in kwargs.items()})[0]
    assert_within_reference_error(got, expected, exact, what)


def build(case):
    module_kwargs, inputs, forward_kwargs = CASES[case]
    module_kwargs = dict(module_kwargs)
    ref, ours = pair(module_kwargs.pop("embed", 64), module_kwargs.pop("heads", 4), **module_kwargs)
    return ref, ours, inputs, forward_kwargs


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_matches_nn_multihead_attention(case):
    ref, ours, (q, k, v), kwargs = build(case)
    for backend in FAST:  # both within the reference's own error, so also within twice of each other
        set_attention_backend(ours, backend)
        out, weights = ours(q, k, v, **kwargs)
        assert weights is None
        assert_like_mha(out, ref, q, k, v, f"{backend} vs nn.MultiheadAttention", **kwargs)


@pytest.mark.parametrize("backend", FAST)
def test_is_causal_hint_without_a_mask(backend):
    """is_causal=True alone means the causal mask (the reference insists on being given it too)."""
    ref, ours, (q, k, v), _ = build("padding_and_causal_bool")
    set_attention_backend(ours, backend)
    for extra in ({}, {"key_padding_mask": padding}):
        assert_like_mha(ours(q, k, v, is_causal=True, **extra)[0], ref, q, k, v, attn_mask=causal_bool, **extra)


def test_need_weights_returns_the_references_weights():
    ref, ours, (q, k, v), kwargs = build("padding_and_causal")
    for average in (True, False):
        expected = ref(q, k, v, need_weights=True, average_attn_weights=average, **kwargs)
        got = ours(q, k, v, need_weights=True, average_attn_weights=average, **kwargs)
        for e, g in zip(expected, got):  # need_weights runs nn.MultiheadAttention's own forward: the same ops
            torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------ causal detection
@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records (is_causal, attn_mask is None, dropout_p) of every sdpa call, which still runs."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((is_causal, attn_mask is None, dropout_p))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def check_call(ours, ref, x, mask, sdpa_calls, is_causal):
    out = ours(x, x, x, attn_mask=mask)[0]
    assert sdpa_calls[-1][:2] == ((True, True) if is_causal else (False, False))
    sdpa_calls.clear()  # the reference may call sdpa itself
    assert_like_mha(out, ref, x, x, x, attn_mask=mask)


def test_causal_mask_becomes_is_causal_and_others_stay_masks(sdpa_calls):
    ref, ours = pair()
    x = randn(2, 10, 64)
    buffer = causal(77)  # open_clip's registered buffer; M2CLIP passes slices of it
    check_call(ours, ref, x, buffer[:10, :10], sdpa_calls, is_causal=True)
    check_call(ours, ref, x, torch.ones(10, 10, dtype=torch.bool).triu(1), sdpa_calls, is_causal=True)
    near_misses = [causal(10).clamp(min=-1e9),  # finite "minus infinity": equivalent, but not *exactly* causal
                   causal(10).T,  # anti-causal
                   causal(10).masked_fill(torch.eye(10, dtype=torch.bool).roll(1, 0), float("-inf"))]
    for mask in near_misses:
        check_call(ours, ref, x, mask, sdpa_calls, is_causal=False)
    assert_like_mha(ours(x, x, x, attn_mask=causal(10).clamp(min=-1e9))[0], ref, x, x, x, attn_mask=causal(10))


def test_detection_runs_once_per_mask_and_sees_in_place_edits(sdpa_calls, monkeypatch):
    compared = []
    real = A._is_exact_causal
    monkeypatch.setattr(A, "_is_exact_causal", lambda m: compared.append(tuple(m.shape)) or real(m))
    ref, ours = pair()
    x, buffer = randn(2, 10, 64), causal(77)
    for _ in range(3):  # every layer and step passes a fresh slice of the same buffer: one comparison
        check_call(ours, ref, x, buffer[:10, :10], sdpa_calls, is_causal=True)
    check_call(ours, ref, randn(2, 12, 64), buffer[:12, :12], sdpa_calls, is_causal=True)
    assert compared == [(10, 10), (12, 12)]

    buffer[3, 1] = float("-inf")  # edited in place: the cached answer must not be reused
    check_call(ours, ref, x, buffer[:10, :10], sdpa_calls, is_causal=False)
    buffer[3, 1] = 0.0
    check_call(ours, ref, x, buffer[:10, :10], sdpa_calls, is_causal=True)


def test_a_new_mask_is_judged_afresh_even_at_a_recycled_address(sdpa_calls):
    ref, ours = pair()
    x = randn(2, 10, 64)
    for i in range(4):  # freed and reallocated each time; the allocator may well hand back the same memory
        mask = causal(10)
        if i % 2:
            mask[5, 2] = float("-inf")
        check_call(ours, ref, x, mask, sdpa_calls, is_causal=not i % 2)
        del mask


# ---------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["text_causal_float", "cross_shared_kv", "odd_head_dim"])
@pytest.mark.parametrize("backend", FAST)
def test_low_precision_error_within_twice_pytorchs_own(dtype, case, backend):
    """As flash-attention's tests: error vs an fp64 reference ≤ 2 × the error of PyTorch's own implementation
    in the same dtype (+ 1 ulp), for the output and for the input and parameter gradients (m2clip_fast/tolerance.py)."""
    ref, ours, (q, k, v), kwargs = build(case)
    set_attention_backend(ours, backend)
    grad_out = randn(*q.shape, seed=9)

    def run(module, cast):
        module = copy.deepcopy(module).to(cast).train()  # train(): the reference's non-fast path, with grads
        qc = q.to(cast).requires_grad_()
        kc = qc if k is q else k.to(cast).requires_grad_()
        vc = kc if v is k else v.to(cast).requires_grad_()
        mask = {n: t.to(cast) if t.is_floating_point() else t for n, t in kwargs.items() if torch.is_tensor(t)}
        out = module(qc, kc, vc, need_weights=False, **{**kwargs, **mask})[0]
        out.backward(grad_out.to(cast))
        grads = {"query": qc.grad, "key": kc.grad, **{n: p.grad for n, p in module.named_parameters()}}
        return {"out": out, **grads}

    exact = run(ref, torch.float64)
    theirs, mine = run(ref, dtype), run(ours, dtype)
    assert_within_reference_error(mine, theirs, exact, f"{backend} {dtype}", dtype=dtype)


# -------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", ["text_causal_float", "padding_and_causal", "cross_shared_kv",
                                  "cross_distinct_kv", "cross_kdim_vdim", "seq_first"])
def test_gradients_match_nn_multihead_attention(case):
    """Input and parameter gradients within 2 × nn.MultiheadAttention's own fp32 error vs a float64 copy."""
    ref, ours, inputs, kwargs = build(case)
    grad_out = None
    results = []
    for module in (ref, ours, copy.deepcopy(ref).double()):
        module.train()  # dropout is 0: training only makes the reference take its differentiable path
        cast = module.in_proj_weight.dtype if module.in_proj_weight is not None else module.q_proj_weight.dtype
        leaves = [t.clone().to(cast).requires_grad_() for t in inputs]
        q = leaves[0]
        k = q if inputs[1] is inputs[0] else leaves[1]
        v = k if inputs[2] is inputs[1] else leaves[2]
        out = module(q, k, v, need_weights=False, **{n: t.to(cast) if t.is_floating_point() else t
                                                     for n, t in kwargs.items()})[0]
        grad_out = randn(*out.shape, seed=5) if grad_out is None else grad_out
        out.backward(grad_out.to(cast))
        names = ["query", "key", "value"] + [n for n, _ in module.named_parameters()]
        results.append(dict(zip(names, [t.grad for t in (q, k, v)] + [p.grad for p in module.parameters()])))
    mha, mine, exact = results
    assert all(g is not None for g in mine.values()), "every input and parameter must receive a gradient"
    assert_within_reference_error(mine, mha, {n: e for n, e in exact.items() if e is not None}, case)


def test_dropout_is_applied_in_training_only(sdpa_calls):
    ref, ours = pair(dropout=0.25)
    x = randn(2, 10, 64)
    evaluation = ours(x, x, x)[0]
    ours.train()
    torch.manual_seed(0)
    trained = ours(x, x, x)[0]
    assert [c[2] for c in sdpa_calls] == [0.0, 0.25]
    assert_like_mha(evaluation, ref, x, x, x)
    assert not torch.allclose(trained, evaluation)


# ------------------------------------------------------------------------------------ open_clip and M2CLIP
def tiny_clip(seed=0):
    M._register_shipped_backbones()
    torch.manual_seed(seed)
    clip = open_clip.create_model("m2clip-tiny").eval()
    with torch.no_grad():  # open_clip leaves attention biases at zero; make them count
        for name, p in clip.named_parameters():
            if name.endswith("in_proj_bias") or name.endswith("out_proj.bias"):
                p.normal_(std=0.2)
    return clip


def clip_inputs():
    tokens = open_clip.get_tokenizer("m2clip-tiny")(["a video of a dog jumping", "juggling", ""])
    return randn(2, 3, 32, 32), tokens


def encode(clip, images, tokens):
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(tokens)


def encode_float64(clip, images, tokens):
    """encode() of a float64 copy of ``clip`` on PyTorch's own attention: the exact side of m2clip_fast/tolerance.py."""
    twin = copy.deepcopy(clip).double()
    set_attention_backend(twin, "torch")
    return encode(twin, images.double(), tokens)


def assert_encodes_like(got, expected, exact, what):
    """Image and text features of another backend within 2 × the fp32 reference's own error vs float64."""
    names = ("image", "text")
    assert_within_reference_error(dict(zip(names, got)), dict(zip(names, expected)), dict(zip(names, exact)), what)


def test_open_clip_model_same_outputs_on_every_backend(sdpa_calls):
    clip = tiny_clip()
    images, tokens = clip_inputs()
    expected, exact = encode(clip, images, tokens), encode_float64(clip, images, tokens)
    sdpa_calls.clear()  # PyTorch's own implementation may use sdpa too
    assert get_attention_backend(clip) == "torch"
    n_blocks = len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks)
    for backend in FAST:
        assert set_attention_backend(clip, backend) == n_blocks
        assert set_attention_backend(clip, backend) == 0  # already there
        assert get_attention_backend(clip) == backend
        assert_encodes_like(encode(clip, images, tokens), expected, exact, backend)
    # sdpa saw the vision tower unmasked and the text tower's causal mask as is_causal, never as a tensor
    assert sdpa_calls and all(c[1] for c in sdpa_calls)
    assert sum(c[0] for c in sdpa_calls) == len(clip.transformer.resblocks)
    assert set_attention_backend(clip, "torch") == n_blocks
    assert all(type(b.attn) is nn.MultiheadAttention for b in clip.transformer.resblocks)
    for got, e in zip(encode(clip, images, tokens), expected):
        torch.testing.assert_close(got, e, atol=0, rtol=0)


def test_swap_keeps_objects_parameters_and_state_dict_keys():
    clip = tiny_clip().to(torch.bfloat16)
    attn = clip.visual.transformer.resblocks[0].attn
    attn.in_proj_weight.requires_grad_(False)
    params = dict(clip.named_parameters())
    keys = list(clip.state_dict())
    set_attention_backend(clip, "sdpa")
    assert clip.visual.transformer.resblocks[0].attn is attn and isinstance(attn, MultiheadAttention)
    assert list(clip.state_dict()) == keys
    for name, p in clip.named_parameters():
        assert p is params[name] and p.dtype == torch.bfloat16
    assert not attn.in_proj_weight.requires_grad and attn.out_proj.weight.requires_grad

    shared = nn.MultiheadAttention(8, 2)
    twice = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    assert set_attention_backend(twice, "math") == 1 and get_attention_backend(shared) == "math"
    assert get_attention_backend(nn.Linear(2, 2)) is None


def test_pretrained_weights_load_into_swapped_model():
    pretrained = tiny_clip(seed=7)
    images, tokens = clip_inputs()
    expected, exact = encode(pretrained, images, tokens), encode_float64(pretrained, images, tokens)
    checkpoint = io.BytesIO()
    torch.save(pretrained.state_dict(), checkpoint)
    checkpoint.seek(0)

    clip = tiny_clip(seed=0)
    set_attention_backend(clip, "sdpa")
    clip.load_state_dict(torch.load(checkpoint), strict=True)
    assert_encodes_like(encode(clip, images, tokens), expected, exact, "sdpa with loaded weights")
    plain = tiny_clip(seed=3)  # and the other way: a swapped model's checkpoint loads into plain open_clip
    plain.load_state_dict(clip.state_dict(), strict=True)
    for got, e in zip(encode(plain, images, tokens), expected):
        torch.testing.assert_close(got, e, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # the float64 copy runs without autocast
def test_m2clip_with_cmlm_cross_attention_same_losses_and_predictions():
    from m2clip_fast import create_model

    torch.manual_seed(0)
    model = create_model("tiny", class_names=["moving left", "moving right", "growing"], fused=False,
                         attention="torch").eval()
    video, labels = randn(2, 4, 3, 32, 32), torch.tensor([0, 2])

    def run(m, v):
        """Every loss and every prediction of m on v, by name."""
        torch.manual_seed(1)  # CMLM masks label words at random
        with torch.no_grad():
            losses, probs = m(v, labels), m.predict(v)
        return {**{f"loss {k}": x for k, x in losses.items()}, **{f"predict {k}": x for k, x in probs.items()}}

    expected = run(model, video)
    exact = run(copy.deepcopy(model).double(), video.double())
    clip = model.clip
    towers = len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks)
    assert set_attention_backend(model, "sdpa") == towers + 1  # + the CMLM cross-attention block
    assert isinstance(model.cmlm_block.attn, MultiheadAttention)
    # within 2 × the torch backend's own fp32 error vs float64 (m2clip_fast/tolerance.py)
    assert_within_reference_error(run(model, video), expected, exact, "sdpa")


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_backend_is_a_clear_error_and_changes_nothing():
    clip = tiny_clip()
    with pytest.raises(ValueError, match="'flash'.*sdpa, xformers, math, torch"):
        set_attention_backend(clip, "flash")
    with pytest.raises(ValueError, match="valid backends"):
        MultiheadAttention(8, 2, backend="Sdpa")
    assert get_attention_backend(clip) == "torch"


def test_unsupported_module_is_refused_before_anything_changes():
    model = nn.ModuleList([nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True)])
    with pytest.raises(NotImplementedError, match="^1: .*add_bias_kv"):
        set_attention_backend(model, "sdpa")
    assert get_attention_backend(model) == "torch"


def test_wrong_mask_shapes_are_clear_errors():
    ref, ours = pair()
    x = randn(2, 10, 64)
    with pytest.raises(ValueError, match=r"attn_mask must be \(L, S\) = \(10, 10\).*got \(9, 10\)"):
        ours(x, x, x, attn_mask=causal(10)[:9])
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, S\) = \(2, 10\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(10, 2, dtype=torch.bool))


def test_mixed_backends_are_reported():
    model = nn.ModuleList([nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)])
    set_attention_backend(model[0], "math")
    with pytest.raises(ValueError, match="different backends.*'math': 1.*'torch': 1"):
        get_attention_backend(model)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_not_installed_is_a_clear_error():
    clip = tiny_clip()
    with pytest.raises(ImportError, match="'xformers' needs the xformers package, which is not installed"):
        set_attention_backend(clip, "xformers")
    assert get_attention_backend(clip) == "torch"


def test_xformers_with_cpu_tensors_is_a_clear_error(monkeypatch):
    """xformers stubbed as installed (only to reach the device check): CPU tensors must raise, not fall back."""
    def never(*args, **kwargs):
        raise AssertionError("xformers must not be called with CPU tensors")

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask = never, never
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    ref, ours = pair()
    assert set_attention_backend(ours, "xformers") == 1
    x = randn(2, 10, 64)
    with pytest.raises(RuntimeError, match="'xformers' runs on CUDA tensors only, got cpu"):
        ours(x, x, x, attn_mask=causal(10))


@pytest.mark.parametrize("mask_shape", [(7, 13), (2, 3, 7, 13), (2, 1, 1, 13)])
def test_xformers_bias_layout(mask_shape):
    """The additive mask handed to xformers: full (B, H, L, S) shape, unchanged values, rows 8-aligned."""
    mask = randn(*mask_shape, seed=6)
    bias = A._xformers_bias(mask, 2, 3, 7, 13)
    assert bias.shape == (2, 3, 7, 13) and bias.stride(-1) == 1
    assert all(s % 8 == 0 for s in bias.stride()[:-1])
    torch.testing.assert_close(bias, mask.expand(2, 3, 7, 13), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- xformers (CUDA)
needs_xformers_on_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None,
    reason="xformers runs on CUDA tensors only (no GPU or no xformers here)")


@needs_xformers_on_cuda
@pytest.mark.parametrize("case", ["vision_no_mask", "text_causal_float", "padding_and_causal", "cross_shared_kv",
                                  "odd_head_dim"])
def test_xformers_matches_the_reference_on_cuda(case):
    """fp32 close to nn.MultiheadAttention; bf16 / fp16 output and gradients within twice PyTorch's own error."""
    ref, ours, (q, k, v), kwargs = build(case)
    ref, ours = ref.cuda(), ours.cuda()
    set_attention_backend(ours, "xformers")
    cuda_kwargs = {n: t.cuda() if torch.is_tensor(t) else t for n, t in kwargs.items()}
    q, k, v = (t.cuda() for t in (q, k, v))
    expected = ref(q, k, v, need_weights=False, **cuda_kwargs)[0]
    # a fixed bound, not the float64 rule: whether xformers' fp32 kernels round like fp32 or use TF32 on a given
    # GPU decides which rule is right, and no GPU here has told; 1e-4 is ~800 fp32 ulps, ~1/10 of a TF32 ulp
    torch.testing.assert_close(ours(q, k, v, **cuda_kwargs)[0], expected, atol=1e-4, rtol=1e-4)
    grad_out = randn(*q.shape, seed=9).cuda()

    def run(module, dtype):
        module = copy.deepcopy(module).to(dtype).train()
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        mask = {n: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for n, t in cuda_kwargs.items()}
        out = module(*leaves, need_weights=False, **mask)[0]
        out.backward(grad_out.to(dtype))
        return {"out": out, "query": leaves[0].grad, **{n: p.grad for n, p in module.named_parameters()}}

    exact = run(ref, torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        theirs, mine = run(ref, dtype), run(ours, dtype)
        assert_within_reference_error(mine, theirs, exact, f"xformers {dtype}", dtype=dtype)
