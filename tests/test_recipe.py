"""The official training recipe: the presets' values against the official scripts, the global batch reached by
accumulation, the official weight-decay rule, and a run that prints and resumes with them."""
import json

import pytest
import torch

from m2clip_fast import create_model
from m2clip_fast.checkpoint import CheckpointError, check_same_run, run_settings
from m2clip_fast.presets import ConfigError, resolve_config
from m2clip_fast.train import accumulation_steps, main as train_main, param_groups
from test_train import SMALL, base_args, tunable

# The official scripts/train_k400_clip_vit_b16_adapter12x384.sh, scripts/train_ssv2_clip_vit_b16.sh and main.py
# defaults, written out here independently of presets.py. views: CLIPSxCROPS (temporal x spatial).
OFFICIAL = {
    "k400_b16_8f": {
        "num_frames": 8, "sampling": "dense", "stride": 16, "resize": "short_side_jitter", "scale_range": (1.0, 1.15),
        "flip": True, "rand_augment": None, "batch_size": 36, "global_batch": 72, "epochs": 12, "warmup_epochs": 2,
        "blr": 1e-3, "weight_decay": 1e-2, "text_lr_scale": 0.5, "no_decay": "bias", "views": "3x4",
        "templates": ("A video of {}",), "ted_adapters": 12,
    },
    "ssv2_b16_8f": {
        "num_frames": 8, "sampling": "uniform", "resize": "random_resized_crop", "scale_range": (0.08, 1.0),
        "flip": False, "rand_augment": "rand-m7-n4-mstd0.5-inc1", "batch_size": 32, "global_batch": 128,
        "epochs": 50, "warmup_epochs": 2, "blr": 1e-3, "weight_decay": 1e-2, "text_lr_scale": 0.5,
        "no_decay": "bias", "views": "1x3", "templates": ("A video of {}",), "ted_adapters": 24,
    },
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_presets_hold_the_official_values(preset):
    cfg, want = resolve_config(preset), OFFICIAL[preset]
    adapters = cfg.ted_layers * (cfg.ted_pre_attn + cfg.ted_pre_mlp)
    got = {**{k: cfg.train[k] for k in want if k in cfg.train}, "num_frames": cfg.num_frames,
           "templates": cfg.templates, "ted_adapters": adapters}
    assert got == want
    if want["sampling"] == "dense":
        assert cfg.train["stride"] == want["stride"]


def test_lr_uses_the_global_batch():
    train = resolve_config("k400_b16_8f").train
    for world in (1, 2):  # 2 x 36 = the official 2 GPUs: no accumulation; 1 process: 2 micro-batches
        accum = accumulation_steps(train, world)
        assert accum == 2 // world
        assert train["blr"] * train["batch_size"] * accum * world / 256 == pytest.approx(1e-3 * 72 / 256)
    assert accumulation_steps(resolve_config("ssv2_b16_8f").train, 1) == 4  # 128 = 4 x 32


def test_accumulation_steps_from_global_batch_and_world_size():
    def steps(global_batch, batch, world, accum=1):
        return accumulation_steps({"global_batch": global_batch, "batch_size": batch, "accum_steps": accum}, world)

    assert steps(None, 8, 2, accum=3) == 3  # no global batch: accum_steps as given
    assert steps(72, 36, 1) == 2 and steps(72, 9, 8) == 1 and steps(128, 8, 4) == 4
    with pytest.raises(ConfigError, match=r"train.global_batch=72 is not a multiple of train.batch_size=36 x 8 "
                                          r"process\(es\) = 288; use a train.batch_size that divides it over 8 "
                                          r"process\(es\): 1, 3, 9$"):
        steps(72, 36, 8)
    with pytest.raises(ConfigError, match=r"= 180; use a train.global_batch that is a multiple of 180$"):
        steps(72, 36, 5)
    with pytest.raises(ConfigError, match=r"train.accum_steps=2 \(expected 1 when train.global_batch is set"):
        resolve_config("k400_b16_8f", overrides={"train": {"accum_steps": 2}})


def test_official_weight_decay_rule_by_hand_count():
    """tiny: 2 TED adapters (6 weights + 6 biases each), the temporal adapter (3 + 3), the VC head (1 + 1), a text
    adapter and the CMLM adapter (2 + 2 each), the MLM head (dense, norm, decoder: 3 weights + 3 biases)."""
    model = create_model("tiny", class_names=["a", "b"], fused=False)
    groups = {(g["lr"], g["weight_decay"]): set(g["names"]) for g in param_groups(model, 1.0, 0.01, 0.5, "bias")}
    text_biases = {"text_adapters.1.down.bias", "text_adapters.1.up.bias", "cmlm_adapter.down.bias",
                   "cmlm_adapter.up.bias"}
    assert groups[(0.5, 0.0)] == text_biases
    assert len(groups[(0.5, 0.01)]) == 4 and all(n.endswith(".weight") for n in groups[(0.5, 0.01)])
    assert len(groups[(1.0, 0.0)]) == 2 * 6 + 3 + 1 + 3 and all(n.endswith(".bias") for n in groups[(1.0, 0.0)])
    assert len(groups[(1.0, 0.01)]) == 2 * 6 + 3 + 1 + 3
    assert "mlm_head.norm.weight" in groups[(1.0, 0.01)]  # the official decays the LayerNorm's weight
    ours = {(g["lr"], g["weight_decay"]): set(g["names"]) for g in param_groups(model, 1.0, 0.01, 0.5, "1d")}
    assert ours[(1.0, 0.0)] == groups[(1.0, 0.0)] | {"mlm_head.norm.weight"}


def test_old_checkpoints_compare_as_trained_before_the_new_keys():
    cfg = resolve_config("tiny")
    settings = run_settings(cfg, None, 0, 1)
    old = {k: v for k, v in settings.items() if k not in ("train.global_batch", "train.no_decay", "train.resize",
                                                              "train.scale_range", "train.rand_augment")}
    ckpt = {"run": {"settings": old, "preset": "tiny"}}
    check_same_run(ckpt, "old.pt", settings, "tiny")  # the defaults are what those runs did
    changed = run_settings(resolve_config("tiny", overrides={"train": {"no_decay": "bias"}}), None, 0, 1)
    with pytest.raises(CheckpointError, match=r"train.no_decay: '1d' in the checkpoint, 'bias' now"):
        check_same_run(ckpt, "old.pt", changed, "tiny")


SSV2_AUGMENT = ["train.resize=random_resized_crop", "train.scale_range=(0.08, 1.0)",
                "train.rand_augment=rand-m7-n4-mstd0.5-inc1", "train.epochs=1"]


def test_a_run_prints_the_batch_per_process_and_the_global_batch(dataset, tmp_path, capsys):
    """Batch 4 per process, global batch 8: 2 micro-batches per step, lr from the global batch."""
    run = tmp_path / "run"
    args = base_args(dataset, run, "--max-steps", "1", *SMALL, "train.global_batch=8", "train.epochs=1")
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "batch 4 per process x 1 process(es) x 2 accumulation step(s) = global batch 8, lr 2.50e-03" in out
    config = json.loads((run / "config.json").read_text())  # demo blr 0.08 x 8 / 256
    assert (config["global_batch"], config["accum_steps"], config["lr"]) == (8, 2, pytest.approx(2.5e-3))
    assert train_main(base_args(dataset, tmp_path / "odd", "--max-steps", "1", *SMALL, "train.global_batch=6")) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m m2clip_fast.train: error: train.global_batch=6 is not a multiple of "
                          "train.batch_size=4 x 1 process(es) = 4; use a train.batch_size that divides it over 1 "
                          "process(es): 1, 2, 3, 6\n")
    # 16 training clips are 4 batches of 4, but a step of 32 would need 8: refused, not a run of no steps
    assert train_main(base_args(dataset, tmp_path / "few", "--max-steps", "1", *SMALL, "train.global_batch=32")) == 2
    assert ("error: 16 training samples make no full optimizer step of global batch 32 (4 per process x 1 "
            "process(es) x 8 accumulation steps)") in capsys.readouterr().err


@pytest.mark.slow  # three short training runs, ~30 s
def test_resume_is_exact_with_accumulation_and_the_ssv2_augmentation(dataset, tmp_path):
    """RandAugment and random resized crops are drawn from each item's seeded generator: a run stopped after one
    step of two micro-batches and resumed equals the uninterrupted run bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = [*SMALL, "train.global_batch=8", *SSV2_AUGMENT]
    assert train_main(base_args(dataset, straight, "--max-steps", "2", *extra)) == 0
    assert train_main(base_args(dataset, resumed, "--max-steps", "1", *extra)) == 0
    assert train_main(base_args(dataset, resumed, "--max-steps", "2", "--resume", *extra)) == 0
    a, a_state = tunable(straight / "checkpoints" / "last.pt")
    b, b_state = tunable(resumed / "checkpoints" / "last.pt")
    assert a_state["step"] == b_state["step"] == 2
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def dataset(synthetic_dataset):
    return synthetic_dataset
