"""Presets, YAML configs, overrides, and the info CLI's parameter accounting."""
from pathlib import Path

import pytest

from m2clip_fast import create_model
from m2clip_fast.info import OFFICIAL_K400, forward_flops, main as info_main, tunable_by_module
from m2clip_fast.presets import PRESETS, parse_overrides, resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_parse_literals_and_nesting():
    assert parse_overrides(["train.epochs=3", "ted_bottleneck=64", "templates=['{}']", "backbone=ViT-L-14"]) == {
        "train": {"epochs": 3}, "ted_bottleneck": 64, "templates": ["{}"], "backbone": "ViT-L-14"}


def test_layering_preset_yaml_overrides():
    cfg = resolve_config(config_file=CONFIGS / "k400_b16_16f.yaml", overrides={"train": {"epochs": 1}})
    assert cfg.num_frames == 16 and cfg.train["batch_size"] == 18 and cfg.train["epochs"] == 1
    assert cfg.train["blr"] == PRESETS["k400_b16_8f"]["train"]["blr"]
    assert resolve_config("ssv2_b16_8f").ted_pre_attn and not resolve_config("ssv2_b16_8f").train["flip"]


def test_every_shipped_yaml_resolves():
    for path in CONFIGS.glob("*.yaml"):
        resolve_config(config_file=path)


def test_unknown_keys_and_presets_are_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'ted_botleneck'"):
        resolve_config("tiny", overrides={"ted_botleneck": 3})
    with pytest.raises(KeyError, match="unknown preset 'k401'"):
        resolve_config("k401")


def test_k400_counts_the_official_module_set():
    model = create_model("k400_b16_8f", fused=False)
    groups = tunable_by_module(model)
    for key, value in OFFICIAL_K400.items():
        assert groups[key] == value, key
    assert groups["MLM decoder"] == 513 * len(model.vocabulary)
    assert len(model.ted_adapters) == 12 and model.image_size == 224 and model.num_classes == 400


def test_ssv2_has_24_adapters():
    model = create_model("ssv2_b16_8f", fused=False)
    assert len(model.ted_adapters) == 24 and model.num_classes == 174


def test_info_cli_prints_counts_and_flops(capsys):
    info_main(["--preset", "tiny"])
    out = capsys.readouterr().out
    assert "tunable parameters" in out and "MLM vocabulary V =" in out
    flops = float(out.rsplit("predict):", 1)[1].split()[0])
    assert flops > 0


def test_flop_count_of_adapters_matches_hand_count():
    """The FLOPs the adapters add equal 2·m·n·k per GEMM and 2·outputs·taps per depthwise conv."""
    classes = ["a", "b", "c"]
    with_adapters = create_model("tiny", class_names=classes, fused=False)
    without = create_model("tiny", class_names=classes, fused=False, ted_adapters=False, temporal_adapter=False)
    t, (h, w) = with_adapters.num_frames, with_adapters.grid
    tokens, patches = t * (1 + h * w), t * h * w
    c, r = with_adapters.clip.visual.transformer.width, with_adapters.config.ted_bottleneck
    per_ted = 2 * tokens * c * r * 2 + 2 * tokens * r * 3 + 2 * patches * c * r * 2 + 2 * patches * r * 9
    # the last block's pre-MLP adapter sees the class tokens only (t rows): its E branch
    last_ted = 2 * t * c * r * 2 + 2 * t * r * 3
    d = with_adapters.clip.text_projection.shape[1]
    temporal = 2 * t * d * (d // 2) * 2 + 2 * t * (d // 2) * 3
    expected = (len(with_adapters.ted_adapters) - 1) * per_ted + last_ted + temporal
    assert forward_flops(with_adapters) - forward_flops(without) == expected
    with_adapters.last_block_class_token_only = False
    assert forward_flops(with_adapters) - forward_flops(without) > expected + per_ted - last_ted


def test_info_cli_errors_speak_command_line(capsys, tmp_path):
    """A preset without a class list asks for --class-names FILE (not the Python API's class_names=[...])."""
    assert info_main(["--preset", "demo", "--no-flops"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m m2clip_fast.info: error: preset demo has no class list: pass --class-names FILE")
    assert "class_names=[" not in err
    assert info_main(["--preset", "tiny", "--no-flops", "--set", "ted_botleneck=3"]) == 2
    assert "error: unknown config key 'ted_botleneck'" in capsys.readouterr().err
    classes = tmp_path / "classes.txt"
    classes.write_text("left\nright\n")
    assert info_main(["--preset", "demo", "--no-flops", "--class-names", str(classes)]) == 0
    assert ", 2 classes," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        info_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m m2clip_fast.info ")
