"""M2CLIP on the tiny open_clip backbone: shapes, exact frozen-CLIP equivalence when fresh, gradients,
losses, CMLM learning, text cache, checkpoint round-trip and input validation."""
import copy
import warnings

import open_clip
import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.model import load_clip

FRAMES, SIZE = 4, 32
CLASSES = ["moving left", "moving right", "rotating clockwise", "rotating anticlockwise", "growing"]


def tiny(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("fused", False)
    return create_model("tiny", class_names=CLASSES, **overrides)


def video(batch=2, seed=1):
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def randomise_tunable(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def model():
    # PyTorch's own attention, as in the plain open_clip model, so "exactly CLIP" can be bitwise.
    return tiny(attention="torch").eval()


@pytest.fixture(scope="module")
def plain_clip(model):
    clip = load_clip("m2clip-tiny", None, True)
    clip.load_state_dict(model.clip.state_dict(), strict=True)
    return clip.eval()


def test_shapes_and_api(model):
    v = video()
    assert model.num_frames == FRAMES and model.image_size == SIZE
    assert model.encode_video(v).shape == (2, 64)
    assert model.encode_text(CLASSES).shape == (5, 64)
    probs = model.predict(v)
    assert set(probs) == {"text", "vc", "fused"}
    for p in probs.values():
        assert p.shape == (2, 5)
        torch.testing.assert_close(p.sum(-1), torch.ones(2))
    zero_shot = model.predict(v, class_names=["jumping", "sitting"], templates=["a photo of {}.", "{}"])
    assert set(zero_shot) == {"text", "fused"} and zero_shot["text"].shape == (2, 2)


def test_fresh_model_is_exactly_frozen_clip(model, plain_clip):
    v = video()
    with torch.no_grad():
        per_frame = plain_clip.encode_image(v.flatten(0, 1)).reshape(2, FRAMES, -1)
        model.last_block_class_token_only = False  # bitwise needs the same GEMM shapes as CLIP's
        try:
            assert torch.equal(model.encode_video(v), per_frame.mean(dim=1))
        finally:
            model.last_block_class_token_only = True
        torch.testing.assert_close(model.encode_video(v), per_frame.mean(dim=1), rtol=1e-5, atol=1e-6)
        # Text adapters start with random projections (as the official ones); with their up
        # projection zeroed they are the identity and the text path must reproduce CLIP.
        m = copy.deepcopy(model)
        for adapter in m.text_adapters.values():
            adapter.up.weight.zero_()
        tokens = open_clip.get_tokenizer("m2clip-tiny")([f"a video of a person {c}." for c in CLASSES])
        reference = torch.nn.functional.normalize(plain_clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(m.encode_text(), reference, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_tunable_parameters():
    m = tiny().train()
    randomise_tunable(m)  # zero-initialised convs would otherwise block gradients to the projections
    out = m(video(), torch.tensor([0, 3]))
    assert set(out) == {"loss", "contrastive", "cmc", "vc", "cmlm"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    last = len(m.clip.visual.transformer.resblocks) - 1
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif name.startswith(f"ted_adapters.{last}_pre_mlp.") and "_d." in name:
            # The last block's D branch only writes patch tokens, and nothing reads patch tokens after the
            # last block (the heads use the class token): its gradient is exactly zero, in the official
            # model too; here that block computes class-token rows only, so the branch does not run at all.
            # The E branch also writes the class token, so it does learn.
            assert p.grad is None and name in m.unused_parameters(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_total_loss_is_weighted_sum():
    m = tiny(loss_weights={"contrastive": 0.5, "cmc": 0.5, "vc": 1.0, "cmlm": 0.1}).eval()
    torch.manual_seed(3)
    out = m(video(), torch.tensor([1, 2]))
    expected = 0.5 * out["contrastive"] + 0.5 * out["cmc"] + out["vc"] + 0.1 * out["cmlm"]
    torch.testing.assert_close(out["loss"], expected)
    off = tiny(loss_weights={"vc": 1.0}).eval()
    assert set(off(video(), torch.tensor([1, 2]))) == {"loss", "vc"}


def test_cmlm_loss_is_finite_and_falls_on_an_overfit_batch():
    m = tiny(loss_weights={"cmlm": 1.0}).train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    v, labels = video(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        torch.manual_seed(0)  # the same masked words every step: a truly fixed batch to overfit
        loss = m(v, labels)["cmlm"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses


def test_text_cache_gives_identical_logits_and_tracks_class_list():
    m = tiny().eval()
    randomise_tunable(m)
    v = video()
    cached = m.predict(v)["text"]
    cached_again = m.predict(v)["text"]
    m.use_text_cache = False
    m._text_cache.clear()
    uncached = m.predict(v)["text"]
    assert torch.equal(cached, uncached) and torch.equal(cached, cached_again)
    m.use_text_cache = True
    other = m.encode_text(["a", "b"])
    assert other.shape[0] == 2 and len(m._text_cache) == 1


def test_state_dict_round_trip():
    a = tiny().eval()
    randomise_tunable(a, seed=5)
    b = tiny().eval()
    v = video()
    assert not torch.equal(a.encode_video(v), b.encode_video(v))
    missing, unexpected = b.load_state_dict(a.tunable_state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("clip.", "cmlm_block.")) for k in missing)
    for key in ("text", "vc"):
        torch.testing.assert_close(a.predict(v)[key], b.predict(v)[key], rtol=0, atol=0)
    c = copy.deepcopy(a)
    torch.testing.assert_close(c.predict(v)["fused"], a.predict(v)["fused"], rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(2, 3, 3, SIZE, SIZE), "3 frames but the model was built for num_frames=4"),
    (lambda: torch.zeros(2, FRAMES, 3, SIZE, SIZE, dtype=torch.uint8), "floating-point tensor, got dtype torch.uint8"),
    (lambda: torch.randn(FRAMES, 3, SIZE, SIZE), "shape \\(B, T, 3, H, W\\), got rank 4"),
    (lambda: torch.randn(1, FRAMES, 3, 24, SIZE), "expected 3x32x32"),
])
def test_bad_video_errors(model, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.encode_video(bad())


def test_bad_labels_error(model):
    # A device-side assert (no host sync in forward): on CPU tensors it raises at once.
    for bad in ([0, 9], [-1, 0]):
        with pytest.raises(RuntimeError, match="labels must lie in \\[0, 5\\)"):
            model(video(), torch.tensor(bad))


def test_unknown_pretrained_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a local file nor an open_clip tag"):
        create_model("tiny", pretrained="no-such-tag", class_names=CLASSES)


def test_bf16_backbone_loss_close_to_fp32():
    """bf16 frozen weights + autocast (adapters/heads stay fp32 masters): losses within 5% of fp32."""
    m = tiny().eval()
    randomise_tunable(m)
    v, labels = video(), torch.tensor([0, 4])
    torch.manual_seed(7)
    ref = m(v, labels)
    m.set_backbone_dtype(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    torch.manual_seed(7)
    low = m(v, labels)
    for key in ("cmc", "vc", "contrastive", "cmlm"):
        assert torch.isfinite(low[key])
        torch.testing.assert_close(low[key].float(), ref[key], rtol=5e-2, atol=2e-2, msg=key)
    low["loss"].backward()
    unused = set(m.unused_parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in m.named_parameters() if p.requires_grad and n not in unused)


def test_end_of_text_path_equals_full_text_path_with_gradients():
    """Only the EOT rows of the last (adapted) text block run each step; values and adapter gradients
    must equal running that block on every token."""
    m = tiny().eval()
    randomise_tunable(m)
    adapter = m.text_adapters[str(m.frozen_text_layers)]
    results = []
    for eot in (True, False):
        m.use_eot_text_path = eot
        m._text_cache.clear()
        adapter.zero_grad()
        emb = m.encode_text()
        (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        results.append((emb.detach(), adapter.down.weight.grad.clone()))
        assert (m._text_cache[next(iter(m._text_cache))][1].dim() == 2) == eot
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    # the full path adds many exact-zero rows into the weight gradient: only summation order differs
    scale = results[1][1].abs().max().item()
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5 * scale)


def test_swapping_a_ted_adapter_changes_what_runs():
    from m2clip_fast.adapters import TEDAdapter

    m = tiny(ted_pre_attn=True).eval()
    v = video()
    before = m.encode_video(v)
    for name in list(m.ted_adapters)[:2]:  # a pre-attention and a pre-MLP adapter
        original = m.ted_adapters[name]
        replacement = TEDAdapter(**{k: getattr(original, k) for k in ("dim", "bottleneck", "num_frames", "grid")})
        for p in replacement.parameters():
            torch.nn.init.normal_(p, std=0.05)
        m.swap_ted_adapter(name, replacement)
        assert m.ted_adapters[name] is replacement
        assert not torch.equal(m.encode_video(v), before), name
        m.swap_ted_adapter(name, original)
        assert torch.equal(m.encode_video(v), before), name


def test_pretrained_local_checkpoint_is_loaded(tmp_path, plain_clip):
    """pretrained= a local file goes through open_clip's own loader (the path users take for OpenAI weights)."""
    path = tmp_path / "tiny_clip.pt"
    torch.save(plain_clip.state_dict(), path)
    torch.manual_seed(123)  # a different random init, which the checkpoint must overwrite
    m = create_model("tiny", pretrained=str(path), class_names=CLASSES, fused=False)
    for name, tensor in plain_clip.state_dict().items():
        assert torch.equal(m.clip.state_dict()[name], tensor), name


@pytest.mark.parametrize("fused,pre_attn", [(False, False), (True, True)])
def test_class_token_only_last_block_changes_nothing_but_the_work(fused, pre_attn):
    """The last vision block computing class-token rows only gives the full block's losses and gradients."""
    model = tiny(fused=fused, ted_pre_attn=pre_attn, attention="sdpa")
    randomise_tunable(model, scale=0.2)
    v, labels = video(), torch.tensor([1, 3])
    results = []
    for trimmed in (False, True):
        model.last_block_class_token_only = trimmed
        torch.manual_seed(5)  # the CMLM masking and the VC dropout draw the same numbers
        model.zero_grad(set_to_none=True)
        losses = model(v, labels)
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: l.detach() for k, l in losses.items()}, grads))
    (full_losses, full_grads), (losses, grads) = results
    for k in full_losses:
        torch.testing.assert_close(losses[k], full_losses[k], rtol=1e-5, atol=1e-6)
    # the last block's D branch gets no gradient either way (nothing reads the patch rows it writes)
    last = f"ted_adapters.{len(model.clip.visual.transformer.resblocks) - 1}_pre_mlp.up_d.weight"
    assert grads.get(last) is None and (full_grads[last] == 0).all()
    assert set(grads) | {n for n in full_grads if "_pre_mlp." in n and "_d." in n} == set(full_grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, full_grads[n], rtol=1e-4, atol=1e-6 * full_grads[n].abs().max().item() + 1e-9)


def test_gradient_checkpointing_computes_the_same():
    """open_clip's checkpointing passes the block's arguments positionally; the adapter hooks must still apply."""
    model = tiny(fused=True, ted_pre_attn=True, attention="sdpa")
    randomise_tunable(model, scale=0.2)
    v, labels = video(), torch.tensor([1, 3])
    results = []
    for checkpointing in (False, True):
        model.clip.visual.set_grad_checkpointing(checkpointing)
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        losses = model(v, labels)
        losses["loss"].backward()
        results.append((losses["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt, plain)
    assert set(ckpt_grads) == set(plain_grads)
    for n, g in ckpt_grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-5, atol=1e-7)


def test_prompt_ensemble_gives_unit_norm_class_embeddings_and_cosine_scores():
    """Several templates: each class embedding is the renormalised mean of its unit-norm prompt embeddings
    (CLIP's ensembling), so 'text' is a softmax of cosines; a bare mean is shorter than 1 by a different amount
    per class, which scales every class's logits differently (what zero-shot evaluation's 8 templates hit)."""
    m = tiny().eval()
    randomise_tunable(m)
    v, names, templates = video(), ["jumping", "sitting down", "surfing"], ["a photo of {}.", "{}", "a clip of {}"]
    t = m.encode_text(names, templates)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    per_template = torch.stack([m.encode_text(names, [template]) for template in templates])
    expected_t = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)
    torch.testing.assert_close(t, expected_t)
    video_emb = torch.nn.functional.normalize(m.encode_video(v), dim=-1)
    expected = (m.clip.logit_scale.exp() * video_emb @ expected_t.t()).softmax(dim=-1)
    torch.testing.assert_close(m.predict(v, class_names=names, templates=templates)["text"], expected)


def test_text_cache_follows_frozen_text_weights():
    """The cache holds what the frozen text layers give: loading other weights into them (a random backbone's
    checkpoint) or any in-place edit must refresh it; training the adapters must not need to."""
    m = tiny().eval()
    v = video()
    m.predict(v)  # fill the cache
    torch.manual_seed(11)
    other = create_model("tiny", class_names=CLASSES, fused=False).eval()
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m.predict(v)["text"], other.predict(v)["text"], rtol=0, atol=0)
    with torch.no_grad():
        m.clip.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    cached = m.predict(v)["text"]
    m.clear_text_cache()
    torch.testing.assert_close(cached, m.predict(v)["text"], rtol=0, atol=0)


@pytest.mark.parametrize("eot", [True, False])
def test_text_cache_is_not_shared_between_autocast_and_full_precision(eot):
    """States cached under bf16 autocast carry bf16 rounding: an fp32 call afterwards must not reuse them."""
    m = tiny().eval()
    m.use_eot_text_path = eot
    reference = m.encode_text().detach()
    m._text_cache.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.encode_text()
    torch.testing.assert_close(m.encode_text().detach(), reference, rtol=0, atol=0)


def test_bf16_backbone_keeps_the_temperature_and_the_similarity_in_fp32():
    """bf16 would round ln(logit scale) (ln 100 → 4.594, a scale of 98.9) and the B×C cosine logits (steps of
    0.1-0.5 at scale 100); both are tiny computations, done in fp32 on top of the bf16 features."""
    m = tiny().eval()
    randomise_tunable(m)
    scale = m.clip.logit_scale.detach().clone()
    m.set_backbone_dtype(torch.bfloat16)
    assert m.backbone_dtype == torch.bfloat16 and torch.equal(m.clip.logit_scale.detach(), scale)
    v = video()
    with torch.no_grad():
        video_emb = torch.nn.functional.normalize(m.encode_video(v).float(), dim=-1)
        text_emb = torch.nn.functional.normalize(m.encode_text().float(), dim=-1)
    expected = (scale.exp() * video_emb @ text_emb.t()).softmax(dim=-1)
    probs = m.predict(v)["text"]
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_train_mode_keeps_every_frozen_module_in_eval_mode():
    m = tiny().train()
    assert m.vc_head.training and m.ted_adapters.training
    frozen = {name for name, module in m.named_modules()
              if name and not any(p.requires_grad for p in module.parameters()) and next(module.parameters(), None)
              is not None}
    assert "cmlm_block" in frozen and "clip" in frozen
    assert not [name for name, module in m.named_modules() if name in frozen and module.training]


def test_no_activation_is_kept_after_a_call():
    """A forward whose loss is dropped without backward (validation with grad on) must free its graph: the
    model must not keep a tensor of it (the captured class tokens) until the next call."""
    m = tiny().train()
    m(video(), torch.tensor([0, 1]))
    assert m._pre_norm_class_token is None
    m.predict(video())
    assert m._pre_norm_class_token is None


def test_class_without_any_word_trains_with_no_cmlm_target():
    """A class name of punctuation only has no word to mask: a warning when the model is built, and batches
    holding it train (CMLM on the other samples; 0 when none has a word) instead of failing."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = create_model("tiny", class_names=["??", "moving left", "growing"], fused=False)
    m.train()
    only = m(video(), torch.tensor([0, 0]))
    assert only["cmlm"].item() == 0.0 and torch.isfinite(only["loss"])
    only["loss"].backward()
    mixed = m(video(), torch.tensor([0, 2]))
    assert mixed["cmlm"].item() > 0 and torch.isfinite(mixed["loss"])
    assert any("without any word" in str(w.message) and "'??'" in str(w.message) for w in caught)
