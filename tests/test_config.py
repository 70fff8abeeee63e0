"""Config typos are errors that name the key, in every layer (preset, YAML, --set) and in the train section."""
import math
from pathlib import Path

import pytest

from m2clip_fast.cli import run_main
from m2clip_fast.presets import ConfigError, parse_overrides, resolve_config


@pytest.mark.parametrize("override, named", [("train.lr=0.1", "train.lr"), ("train.epoch=3", "train.epoch"),
                                             ("ted_botleneck=64", "'ted_botleneck'")])
def test_unknown_keys_are_named(override, named):
    with pytest.raises(ConfigError, match=named):
        resolve_config("tiny", overrides=parse_overrides([override]))


def test_unknown_train_key_in_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\ntrain:\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr.*known keys:.*'blr'"):
        resolve_config(config_file=config)


def test_known_train_keys_still_apply():
    config = resolve_config("tiny", overrides=parse_overrides(["train.blr=0.5", "train.epochs=3"]))
    assert config.train["blr"] == 0.5 and config.train["epochs"] == 3


def test_config_errors_are_user_errors(capsys, monkeypatch):
    """A dict-style KeyError for library callers, a one-line message (not a traceback) on the command line."""
    monkeypatch.delenv("M2CLIP_DEBUG", raising=False)
    with pytest.raises(KeyError):
        resolve_config("k401")

    def cli():
        resolve_config("k401")

    assert run_main(cli, "prog") == 2
    assert capsys.readouterr().err.startswith("prog: error: unknown preset 'k401'; available:")


@pytest.mark.parametrize("override, named", [
    ("train.epochs=abc", "train.epochs='abc'"), ("train.epochs=2.5", "train.epochs=2.5"),
    ("train.epochs=0", "train.epochs=0"), ("ted_bottleneck=abc", "ted_bottleneck='abc'"),
    ("train.blr=nan", "train.blr=nan"), ("train.blr=1e999", "train.blr=inf"), ("train.blr=-inf", "train.blr=-inf"),
    ("train.accum_steps=0", "train.accum_steps=0"), ("train.eval_every=0", "train.eval_every=0"),
    ("train.grad_clip=-1", "train.grad_clip=-1"), ("mask_ratio=1.5", "mask_ratio=1.5"),
    ("num_frames=0", "num_frames=0"), ("train.stride=0", "train.stride=0"), ("train.views=2x2", "train.views"),
    ("train.flip=1", "train.flip=1"), ("train.max_bad_fraction=0", "train.max_bad_fraction=0"),
    ("train.log_every=0", "train.log_every=0"), ("loss_weights={'vc': -1}", "loss_weights")])
def test_wrong_types_and_ranges_are_named(override, named):
    with pytest.raises(ConfigError, match="invalid config value: " + named.replace(".", r"\.").replace("(", r"\(")):
        resolve_config("tiny", overrides=parse_overrides([override]))


def test_train_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        resolve_config("tiny", overrides=parse_overrides(["train=5"]))


def test_every_shipped_preset_and_config_is_valid():
    from m2clip_fast.presets import PRESETS
    for name in PRESETS:
        resolve_config(name)
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        resolve_config(config_file=path)


def test_non_finite_overrides_are_floats():
    parsed = parse_overrides(["a=nan", "b=-inf", "c=Infinity", "d=1e999", "e=word"])
    assert math.isnan(parsed["a"]) and parsed["b"] == -math.inf and parsed["c"] == math.inf
    assert parsed["d"] == math.inf and parsed["e"] == "word"


def test_unknown_backbone_is_a_user_error():
    from m2clip_fast import create_model
    from m2clip_fast.errors import UsageError
    with pytest.raises(UsageError, match="unknown backbone 'nope'"):
        create_model("tiny", backbone="nope", class_names=["a", "b"])


def test_a_key_set_both_as_value_and_section_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.epochs=3': 'train' was set to 5"):
        parse_overrides(["train=5", "train.epochs=3"])
