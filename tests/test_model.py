"""M2CLIP on the tiny open_clip backbone: shapes, exact frozen-CLIP equivalence when fresh, gradients,
losses, CMLM learning, text cache, checkpoint round-trip and input validation."""
import copy
import warnings

import open_clip
import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.model import load_clip
from m2clip_fast.tolerance import assert_within_reference_error, reference_error_violations, relative_error

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
        # other GEMM shapes round differently: within 2 × CLIP's own fp32 error vs float64 (m2clip_fast/tolerance.py)
        clip64 = copy.deepcopy(plain_clip).double()
        exact = clip64.encode_image(v.flatten(0, 1).double()).reshape(2, FRAMES, -1).mean(dim=1)
        assert_within_reference_error(model.encode_video(v), per_frame.mean(dim=1), exact, "class-token-only")
        # Text adapters start with random projections (as the official ones); with their up
        # projection zeroed they are the identity and the text path must reproduce CLIP.
        m = copy.deepcopy(model)
        for adapter in m.text_adapters.values():
            adapter.up.weight.zero_()
        tokens = open_clip.get_tokenizer("m2clip-tiny")([f"a video of a person {c}." for c in CLASSES])
        reference = torch.nn.functional.normalize(plain_clip.encode_text(tokens), dim=-1)
        exact = torch.nn.functional.normalize(clip64.encode_text(tokens), dim=-1)
        assert_within_reference_error(m.encode_text(), reference, exact, "text path")


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


def test_the_kv_norm_alias_is_not_in_the_state_dict_and_old_state_dicts_load():
    """ln_1_kv (an alias of ln_1 in the last vision block and the CMLM block) is never a state_dict key; a
    state_dict written while the CMLM block registered it (its keys twice) loads strictly all the same."""
    a = tiny().eval()
    randomise_tunable(a, seed=3)
    state = a.state_dict()
    assert not [k for k in state if "ln_1_kv" in k]
    assert a.cmlm_block.ln_1_kv is a.cmlm_block.ln_1
    old = dict(state)
    old.update({k.replace(".ln_1.", ".ln_1_kv."): v.clone() for k, v in state.items() if k.startswith("cmlm_block.ln_1.")})
    assert len(old) == len(state) + 2
    b = tiny().eval()
    b.load_state_dict(old, strict=True)
    v = video()
    torch.testing.assert_close(b.predict(v)["fused"], a.predict(v)["fused"], rtol=0, atol=0)


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
        # bf16 keeps 8 significant bits (eps 2^-8 ≈ 0.4%) and rounds weights and activations at every layer;
        # measured ≤ 0.3% on these losses on an AVX2 CPU, where oneDNN emulates bf16 GEMMs in fp32. CPUs with
        # native bf16 dot products (AVX512-BF16, AMX) accumulate differently, so the bound is not tuned to one:
        # 5% (+ 0.02 for losses near 0), far below what a lost cast or a mixed-up weight does to losses of 1-2.
        torch.testing.assert_close(low[key].float(), ref[key], rtol=5e-2, atol=2e-2, msg=key)
    low["loss"].backward()
    unused = set(m.unused_parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in m.named_parameters() if p.requires_grad and n not in unused)


@pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # the float64 copy runs without autocast
def test_end_of_text_path_equals_full_text_path_with_gradients():
    """Only the EOT rows of the last (adapted) text block run each step; values and adapter gradients
    must equal running that block on every token."""
    m = tiny().eval()
    randomise_tunable(m)
    results = []
    for model, eot in ((m, True), (m, False), (copy.deepcopy(m).double(), False)):
        adapter = model.text_adapters[str(model.frozen_text_layers)]
        model.use_eot_text_path = eot
        model._text_cache.clear()
        adapter.zero_grad()
        emb = model.encode_text()
        weights = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)).to(emb.dtype)
        (emb * weights).sum().backward()
        results.append({"embedding": emb.detach(), "down.weight grad": adapter.down.weight.grad.clone()})
        assert (model._text_cache[next(iter(model._text_cache))][1].dim() == 2) == eot
    eot_path, full_path, exact = results
    # only GEMM shapes and summation order differ: within 2 × the full path's fp32 error vs float64
    assert_within_reference_error(eot_path, full_path, exact, "end-of-text path")


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


def losses_and_gradients(model, v, labels):
    """{"loss <head>": each loss, parameter name: its gradient} of one seeded forward + backward."""
    torch.manual_seed(5)  # the CMLM masking and the VC dropout draw the same numbers
    model.zero_grad(set_to_none=True)
    losses = model(v, labels)
    losses["loss"].backward()
    out = {f"loss {k}": loss.detach() for k, loss in losses.items()}
    out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def float64_losses_and_gradients(model, v, labels):
    """The same function in float64: a float64 copy of the model (its TED adapters fall back to the eager
    reference, the fused kernels being fp32/bf16 only) with the last vision block run in full. The heads
    normalise and take logits in fp32 by design (``.float()``), so this reference carries fp32 rounding
    there only, in both paths alike; every block and adapter, where the compared paths differ, is float64."""
    twin = copy.deepcopy(model).double()
    twin.last_block_class_token_only = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "In CPU autocast", UserWarning)  # float64 runs without autocast
        return losses_and_gradients(twin, v.double(), labels)


def class_token_only_runs(fused, pre_attn):
    """(model, then the losses and gradients of: the full last block, the class-token-only last block, float64)."""
    model = tiny(fused=fused, ted_pre_attn=pre_attn, attention="sdpa")
    randomise_tunable(model, scale=0.2)
    v, labels = video(), torch.tensor([1, 3])
    runs = []
    for trimmed in (False, True):
        model.last_block_class_token_only = trimmed
        runs.append(losses_and_gradients(model, v, labels))
    return (model, *runs, float64_losses_and_gradients(model, v, labels))


@pytest.mark.parametrize("fused,pre_attn", [(False, False), (True, True)])
def test_class_token_only_last_block_changes_nothing_but_the_work(fused, pre_attn):
    """The last vision block computing class-token rows only gives the full block's losses and gradients:
    the error model of m2clip_fast/tolerance.py (2 × the full path's own error vs float64), as the GEMM shapes,
    and with them the summation order on any given processor, differ between the two."""
    model, full, trimmed, exact = class_token_only_runs(fused, pre_attn)
    # the last block's D branch gets no gradient either way (nothing reads the patch rows it writes)
    last = f"ted_adapters.{len(model.clip.visual.transformer.resblocks) - 1}_pre_mlp.up_d.weight"
    assert trimmed.get(last) is None and (full[last] == 0).all() and (exact[last] == 0).all()
    assert set(trimmed) | {n for n in full if "_pre_mlp." in n and "_d." in n} == set(full) == set(exact)
    exact = {n: e for n, e in exact.items() if n in trimmed}
    assert_within_reference_error(trimmed, full, exact, "class-token-only vs full last block")


def _class_token_hook_off_by_one(original, row_of):
    """_ClassTokenQueriesHook.__call__ with a genuine off-by-one: patch token 1's row instead of the class
    token's as the block's query (``row_of="query"``) or as the pre-MLP adapter's residual ("tap")."""
    def call(self, module, args, kwargs):
        block_input = self.tap.block_input if self.tap is not None else None
        args, kwargs = original(self, module, args, kwargs)
        if self.enabled and row_of == "query":
            keys = kwargs["k_x"] if "k_x" in kwargs else args[1]
            args = (keys[:, 1:2], *args[1:])
        elif self.enabled:
            self.tap.block_input = block_input[:, 1:2]
        return args, kwargs
    return call


@pytest.mark.parametrize("row_of", ["query", "tap"])
def test_class_token_only_tolerance_catches_an_off_by_one_row(monkeypatch, row_of):
    """The bound of the test above has teeth: the class-token-only path taking the wrong row breaks it, on
    the gradients alone (losses left out) and by orders of magnitude more than the allowed error."""
    from m2clip_fast.model import _ClassTokenQueriesHook

    monkeypatch.setattr(_ClassTokenQueriesHook, "__call__",
                        _class_token_hook_off_by_one(_ClassTokenQueriesHook.__call__, row_of))
    _, full, trimmed, exact = class_token_only_runs(fused=False, pre_attn=False)
    grads = {n: e for n, e in exact.items() if n in trimmed and not n.startswith("loss ")}
    found = reference_error_violations(trimmed, full, grads)
    assert found, "an off-by-one row passed the tolerance"
    worst = max(relative_error({n: trimmed[n]}, {n: grads[n]}) for n in found)
    assert worst > 1e3 * relative_error({n: full[n] for n in grads}, grads), found


def test_gradient_checkpointing_computes_the_same():
    """open_clip's checkpointing passes the block's arguments positionally; the adapter hooks must still
    apply. The recomputed forward runs the same kernels on the same shapes, but autograd may accumulate
    gradients in another order: within the error model of m2clip_fast/tolerance.py against float64."""
    model = tiny(fused=True, ted_pre_attn=True, attention="sdpa")
    randomise_tunable(model, scale=0.2)
    v, labels = video(), torch.tensor([1, 3])
    runs = []
    for checkpointing in (False, True):
        model.clip.visual.set_grad_checkpointing(checkpointing)
        runs.append(losses_and_gradients(model, v, labels))
    model.clip.visual.set_grad_checkpointing(False)
    plain, ckpt = runs
    exact = float64_losses_and_gradients(model, v, labels)
    assert set(ckpt) == set(plain)
    assert_within_reference_error(ckpt, plain, {n: e for n, e in exact.items() if n in plain}, "checkpointing")


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
    # the same features through the same fp32 normalise / matmul / softmax: a few roundings of values ≤ 1;
    # the bf16 logits this guards against differ by ~1e-3
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
