"""Config typos are errors that name the key, in every layer (preset, YAML, --set) and in the train section."""
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
