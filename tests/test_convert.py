"""Official M²-CLIP Adapter2 checkpoints → TEDAdapter (m2clip_fast.convert)."""
import copy
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
from m2clip_fast.tolerance import assert_within_reference_error  # noqa: E402


def assert_computes_official(got, theirs, x, what="output"):
    """got = ours(x) within the error model of m2clip_fast/tolerance.py: 2 × the official module's own fp32 error
    against a float64 copy of it (+ 1 ulp)."""
    with torch.no_grad():
        assert_within_reference_error(got, theirs(x), copy.deepcopy(theirs).double()(x.double()), what)


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
    assert_computes_official(got, theirs, x)
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


# ------------------------------------------------------------------------------------------------
# whole official checkpoints (m2clip_fast.convert.convert_official_checkpoint)

import torch.nn.functional as F  # noqa: E402

from m2clip_fast import create_model  # noqa: E402
from m2clip_fast.convert import convert_official_checkpoint, load_official_checkpoint  # noqa: E402
from m2clip_fast.convert import main as convert_main  # noqa: E402
from m2clip_fast.checkpoint import build_checkpoint, load_model_checkpoint  # noqa: E402


def linear(state, prefix, n_out, n_in, gen):
    state[f"{prefix}.weight"] = torch.randn(n_out, n_in, generator=gen) * n_in ** -0.5
    state[f"{prefix}.bias"] = torch.randn(n_out, generator=gen)


def official_checkpoint(vision_blocks, width, r, embed, text_width, text_r, text_blocks, classes, mlm_words,
                        pre_attn=False, seed=0):
    """The keys and shapes the official main.py saves (every parameter whose name holds 'adapter'),
    written out here by hand from the official models_adapter.py, with random values."""
    gen = torch.Generator().manual_seed(seed)
    state, modules = {}, {}
    for i in vision_blocks:
        for where in ("attn", "mlp") if pre_attn else ("mlp",):
            module = official(width, r, seed=seed + i + (100 if where == "attn" else 0))
            modules[f"{i}_pre_{where}"] = module
            state.update({f"visual.transformer.resblocks.{i}.adapter_pre_{where}.{k}": v
                          for k, v in module.state_dict().items()})
    linear(state, "visual.t_adapter.fc1", embed // 2, embed, gen)
    state["visual.t_adapter.conv.weight"] = torch.randn(embed // 2, 1, 3, generator=gen)
    state["visual.t_adapter.conv.bias"] = torch.randn(embed // 2, generator=gen)
    linear(state, "visual.t_adapter.fc2", embed, embed // 2, gen)
    linear(state, "visual.adapter_fc", classes, width, gen)
    for j in text_blocks:
        linear(state, f"transformer.resblocks.{j}.adapter_pre_mlp.textad_fc1", text_r, text_width, gen)
        linear(state, f"transformer.resblocks.{j}.adapter_pre_mlp.textad_fc2", text_width, text_r, gen)
    linear(state, "mlm_adapter.transform.dense", text_width, text_width, gen)
    state["mlm_adapter.transform.LayerNorm.weight"] = torch.rand(text_width, generator=gen) + 0.5
    state["mlm_adapter.transform.LayerNorm.bias"] = torch.randn(text_width, generator=gen)
    state["mlm_adapter.decoder.weight"] = torch.randn(len(mlm_words), text_width, generator=gen)
    state["mlm_adapter.bias"] = torch.randn(len(mlm_words), generator=gen)
    return state, modules


TINY_CLASSES = ["moving left", "moving right", "rotating clockwise", "growing"]
# the official label-word file lists words in its own order and has words our vocabulary does not
TINY_MLM_WORDS = ["video", "rotating", "of", "moving", "right", "left", "clockwise", "growing", "name"]


@pytest.fixture
def tiny_official():
    # tiny preset: 3 vision blocks (width 128, adapters r=16 in blocks 1-2), embed 64, text width 64,
    # 2 text blocks (adapter in block 1) + the CMLM cross block = official text block 2
    return official_checkpoint([1, 2], 128, 16, 64, 64, 16, [1, 2], len(TINY_CLASSES), TINY_MLM_WORDS)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return create_model("tiny", class_names=TINY_CLASSES, fused=False, **overrides).eval()


def official_t_adapter(x, state):
    """The official t_adapter: x + fc2(depthwise Conv1d over T (fc1(x))), on (3·4, 64) frame embeddings."""
    z = F.linear(x, state["visual.t_adapter.fc1.weight"], state["visual.t_adapter.fc1.bias"])
    z = F.conv1d(z.view(3, 4, 32).transpose(1, 2), state["visual.t_adapter.conv.weight"],
                 state["visual.t_adapter.conv.bias"], padding=1, groups=32).transpose(1, 2).reshape(12, 32)
    return x + F.linear(z, state["visual.t_adapter.fc2.weight"], state["visual.t_adapter.fc2.bias"])


def official_text_adapter(t, state, block):
    """The official text adapter of text block ``block``: t + fc2(gelu(fc1(t)))."""
    p = f"transformer.resblocks.{block}.adapter_pre_mlp.textad_fc"
    hidden = F.gelu(F.linear(t, state[p + "1.weight"], state[p + "1.bias"]))
    return t + F.linear(hidden, state[p + "2.weight"], state[p + "2.bias"])


def test_whole_checkpoint_computes_the_official_functions(tiny_official, tmp_path):
    state, modules = tiny_official
    labels = tmp_path / "mlm_labels.txt"
    labels.write_text("".join(f"{w} {i}\n" for i, w in enumerate(TINY_MLM_WORDS)))
    model = tiny_model()
    unk_row = model.mlm_head.decoder.weight[model.vocabulary.index("[UNK]")].detach().clone()
    frozen = {"visual.proj": model.clip.visual.proj.detach().clone()}  # a full state dict also holds these
    report = load_official_checkpoint(model, {"model": {f"module.{k}": v for k, v in {**state, **frozen}.items()}},
                                      labels)
    assert report.converted == len(state) and report.ignored_frozen == 1 and report.kept_initial == []
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, theirs in modules.items():  # TED adapters: the official-style eager module's output
            x = torch.randn(2 * 4, 1 + 8 * 8, 128, generator=gen)
            theirs.num_frames = 4
            assert_computes_official(model.ted_adapters[name](x), theirs, x, name)
        # each check below: ours in fp32 within 2 × the official formula's fp32 error vs float64
        # (m2clip_fast/tolerance.py)
        double = {k: v.double() for k, v in state.items()}
        x = torch.randn(3 * 4, 64, generator=gen)
        assert_within_reference_error(model.temporal_adapter(x), official_t_adapter(x, state),
                                      official_t_adapter(x.double(), double), "t_adapter")
        # text adapters: block 1 is ours text_adapters["1"], block 2 (the cross block) our cmlm_adapter
        t = torch.randn(5, 64, generator=gen)
        for block, ours in ((1, model.text_adapters["1"]), (2, model.cmlm_adapter)):
            assert_within_reference_error(ours(t), official_text_adapter(t, state, block),
                                          official_text_adapter(t.double(), double, block), f"text block {block}")
    assert torch.equal(model.vc_head.fc.weight, state["visual.adapter_fc.weight"])
    assert torch.equal(model.mlm_head.norm.weight, state["mlm_adapter.transform.LayerNorm.weight"])
    for row, word in enumerate(model.vocabulary):  # decoder rows follow the words, not the indices
        if word == "[UNK]":
            assert torch.equal(model.mlm_head.decoder.weight[row], unk_row)
        else:
            official_row = TINY_MLM_WORDS.index(word)
            assert torch.equal(model.mlm_head.decoder.weight[row], state["mlm_adapter.decoder.weight"][official_row])
            assert model.mlm_head.decoder.bias[row] == state["mlm_adapter.bias"][official_row]
    assert "['[UNK]']" in report.summary() and "'name', 'of', 'video'" in report.summary()


def test_without_the_label_file_the_mlm_decoder_keeps_its_init(tiny_official):
    model = tiny_model()
    before = model.mlm_head.decoder.weight.detach().clone()
    report = load_official_checkpoint(model, tiny_official[0])
    assert torch.equal(model.mlm_head.decoder.weight, before)
    assert report.kept_initial == ["mlm_head.decoder.bias", "mlm_head.decoder.weight"]
    assert "no label-word file" in report.summary()


def test_layout_mismatches_are_named(tiny_official):
    state, _ = tiny_official
    ssv2_text = dict(state)  # the official SSv2 model also has text adapters before attention
    ssv2_text.update({k.replace("adapter_pre_mlp", "adapter_pre_attn"): v for k, v in state.items()
                      if k.startswith("transformer.resblocks.1.")})
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.adapter_pre_attn\.\* \(text adapters before"):
        convert_official_checkpoint(ssv2_text, tiny_model())
    pre_attn, _ = official_checkpoint([1, 2], 128, 16, 64, 64, 16, [1, 2], 4, TINY_MLM_WORDS, pre_attn=True)
    with pytest.raises(ValueError, match=r"resblocks\.1\.adapter_pre_attn\.\* \(the model has TED adapters at"):
        convert_official_checkpoint(pre_attn, tiny_model())
    convert_official_checkpoint(pre_attn, tiny_model(ted_pre_attn=True))  # the SSv2 vision layout fits this one
    with pytest.raises(ValueError, match=r"ted_adapters\.1_pre_mlp\.down_e\.weight: checkpoint \(16, 128\), model "
                                         r"\(24, 128\)"):
        convert_official_checkpoint(state, tiny_model(ted_bottleneck=24))
    incomplete = dict(state)
    del incomplete["visual.t_adapter.conv.bias"]
    with pytest.raises(KeyError, match="visual.t_adapter.conv.bias"):
        convert_official_checkpoint(incomplete, tiny_model())
    stray = {**state, "visual.adapter_extra.weight": torch.zeros(1), "visual.proj": torch.zeros(128, 64)}
    with pytest.raises(ValueError, match=r"no place for: visual\.adapter_extra\.weight"):
        convert_official_checkpoint(stray, tiny_model())


def test_cli_writes_a_checkpoint_evaluate_can_load(tiny_official, tmp_path):
    state, _ = tiny_official
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n")
    torch.save({"model": state, "optimizer": {}, "next_epoch": 12}, tmp_path / "checkpoint-11.pth")
    out = tmp_path / "ours.pt"
    assert convert_main([str(tmp_path / "checkpoint-11.pth"), "--out", str(out), "--preset", "tiny",
                         "--pretrained", "none", "--class-names", str(classes)]) == 0
    model, ckpt = load_model_checkpoint(out)
    assert model.config.templates == ("A video of {}",)
    assert torch.equal(model.ted_adapters["2_pre_mlp"].conv_d.weight,
                       state["visual.transformer.resblocks.2.adapter_pre_mlp.offset_adapter.conv.weight"][:, :, 0])
    assert torch.equal(model.text_adapters["1"].up.bias,
                       state["transformer.resblocks.1.adapter_pre_mlp.textad_fc2.bias"])


def test_the_official_k400_b16_layout_converts_completely():
    """Every one of the official K400 B/16 run's 16,138,136 trained parameters finds its place in k400_b16_8f."""
    words = [f"w{i}" for i in range(520)]  # the official K400 label-word file has 520 words
    state, _ = official_checkpoint(range(12), 768, 384, 512, 512, 384, [11, 12], 400, words)
    assert sum(v.numel() for v in state.values()) == 16_138_136
    model = create_model("k400_b16_8f", pretrained=None)
    ours, report = convert_official_checkpoint(state, model)
    assert report.converted == len(state)
    assert set(ours) | {"mlm_head.decoder.weight", "mlm_head.decoder.bias"} == set(model.tunable_state_dict())


def test_checkpoint_without_official_keys_is_refused(tiny_official, tmp_path, capsys):
    """A plain CLIP, one of ours or a wrong file must not 'convert' into a randomly initialised model."""
    torch.save({"model": {"foo": torch.zeros(2), "visual.proj": torch.zeros(128, 64)}}, tmp_path / "unrelated.pth")
    out = tmp_path / "out.pt"
    assert convert_main([str(tmp_path / "unrelated.pth"), "--out", str(out), "--preset", "tiny",
                         "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m m2clip_fast.convert: error: no official M²-CLIP keys found in ")
    assert "unrelated.pth; is this an official checkpoint?" in err and "['foo', 'visual.proj']" in err
    assert not out.exists()
    ours = build_checkpoint(tiny_model(), "none")  # our own format names its tuned keys differently
    with pytest.raises(ValueError, match="no official M²-CLIP keys found in the checkpoint.*m2clip-fast checkpoint "
                                         "already"):
        convert_official_checkpoint(ours, tiny_model())
    with pytest.raises(ValueError, match="no official M²-CLIP keys"):  # the API refuses it too
        convert_official_checkpoint({"visual.proj": torch.zeros(128, 64)}, tiny_model())


@pytest.mark.parametrize("with_labels", [False, True])
def test_partial_mlm_head_is_named(tiny_official, tmp_path, capsys, with_labels):
    state, _ = tiny_official
    del state["mlm_adapter.bias"]
    labels = tmp_path / "mlm_labels.txt"
    labels.write_text("".join(f"{w} {i}\n" for i, w in enumerate(TINY_MLM_WORDS)))
    with pytest.raises(KeyError, match="lacks mlm_adapter.bias"):
        convert_official_checkpoint(state, tiny_model(), labels if with_labels else None)
    torch.save({"model": state}, tmp_path / "checkpoint-5.pth")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES) + "\n")
    argv = [str(tmp_path / "checkpoint-5.pth"), "--out", str(tmp_path / "out.pt"), "--preset", "tiny",
            "--pretrained", "none", "--class-names", str(classes)]
    assert convert_main(argv + (["--mlm-labels", str(labels)] if with_labels else [])) == 2
    err = capsys.readouterr().err
    assert "python -m m2clip_fast.convert: error: official checkpoint has mlm_adapter.* but lacks mlm_adapter.bias\n" \
        in err
    assert not (tmp_path / "out.pt").exists()


def test_cli_names_an_unreadable_checkpoint_in_one_line(tiny_official, tmp_path, capsys):
    state, _ = tiny_official
    torch.save({"model": state}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.pth").write_bytes(b"")
    for name, reason in (("trunc.pth", "is not a readable PyTorch checkpoint"), ("zero.pth", "is empty (0 bytes)"),
                         ("missing.pth", "does not exist")):
        assert convert_main([str(tmp_path / name), "--out", str(tmp_path / "out.pt"), "--preset", "tiny",
                             "--pretrained", "none"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m m2clip_fast.convert: error: official checkpoint {tmp_path / name} {reason}")
        assert "Traceback" not in err
