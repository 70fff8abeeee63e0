"""The ablation command (m2clip_fast.ablate) and its report (m2clip_fast.ablation_report): the variants build the
models they name, mean ± std, the tables, and --quick end to end with its reuse of finished runs."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from m2clip_fast import ablate, train
from m2clip_fast.ablation_report import format_mean_std, mean_std, ordering, report_markdown
from m2clip_fast.data.synthetic import CLASSES
from m2clip_fast.model import create_model
from m2clip_fast.presets import resolve_config

ALL_HEADS = {"contrastive", "cmc", "vc", "cmlm"}
# variant: (config keys it changes, TED adapters, E branch, D branch, temporal adapter, CMLM head, losses computed)
EXPECTED = {
    "no_adapters": ({"ted_adapters", "temporal_adapter"}, 0, None, None, False, True, ALL_HEADS),
    "te": ({"ted_difference"}, 6, True, False, True, True, ALL_HEADS),
    "td": ({"ted_enhance"}, 6, False, True, True, True, ALL_HEADS),
    "te_td": (set(), 6, True, True, True, True, ALL_HEADS),
    "contrastive": ({"loss_weights"}, 6, True, True, True, False, {"contrastive"}),
    "contrastive_cmc": ({"loss_weights"}, 6, True, True, True, False, {"contrastive", "cmc"}),
    "contrastive_cmc_cmlm": ({"loss_weights"}, 6, True, True, True, True, {"contrastive", "cmc", "cmlm"}),
}


def variant_config(name):
    """The config train resolves from the command line the ablation gives it."""
    argv = ablate.run_argv(ablate.VARIANTS[name], 0, ablate.FULL, Path("data"), Path("out"))
    return train.build_config(train.parse_args(argv))


def test_the_variants_are_the_papers_rows():
    assert list(ablate.VARIANTS) == list(EXPECTED)
    rows = {title.split(":")[0]: [(label, name) for label, name, _ in rows] for title, rows in ablate.TABLES}
    assert rows == {
        "Table 5": [("no adapters", "no_adapters"), ("TE only", "te"), ("TD only", "td"), ("TE + TD", "te_td")],
        "Table 7": [("contrastive", "contrastive"), ("+ CMC", "contrastive_cmc"),
                    ("+ CMC + CMLM", "contrastive_cmc_cmlm"), ("+ CMC + CMLM + VC", "te_td")]}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_variant_changes_only_its_own_keys_and_builds_the_model_it_names(name):
    changed, n_ted, enhance, difference, temporal, cmlm, losses = EXPECTED[name]
    cfg, demo = variant_config(name), resolve_config("demo")
    cfg_fields, demo_fields = dataclasses.asdict(cfg), dataclasses.asdict(demo)
    differing = {k for k in cfg_fields if cfg_fields[k] != demo_fields[k]} - {"class_names", "train"}
    assert differing == changed
    assert cfg.train == {**demo.train, "epochs": ablate.FULL.epochs, "batch_size": ablate.FULL.batch_size,
                         "blr": ablate.FULL.blr, "eval_every": ablate.FULL.epochs}

    torch.manual_seed(0)
    model = create_model(cfg, class_names=list(CLASSES))
    assert len(model.ted_adapters) == n_ted
    for adapter in model.ted_adapters.values():
        assert (hasattr(adapter, "down_e"), hasattr(adapter, "down_d")) == (enhance, difference)
    assert (model.temporal_adapter is not None) == temporal
    assert hasattr(model, "mlm_head") == cmlm
    out = model(torch.randn(2, cfg.num_frames, 3, model.image_size, model.image_size), torch.tensor([0, 5]))
    assert set(out) == losses | {"loss"}
    assert torch.isclose(out["loss"], sum(model.loss_weights[h] * out[h] for h in losses))
    untrained_vc = any(n.startswith("vc_head.") for n in model.unused_parameters())
    assert untrained_vc == ("vc" not in losses)
    assert ablate.scored_head(ablate.VARIANTS[name]) == ("fused" if "vc" in losses else "text")


def test_mean_and_sample_std_against_hand_numbers():
    assert mean_std([70.0, 80.0, 90.0]) == (80.0, 10.0)
    mean, std = mean_std([12.5, 25.0])
    assert mean == 18.75 and std == pytest.approx(12.5 / 2 ** 0.5)  # sqrt(2 * 6.25**2 / 1)
    assert mean_std([50.0]) == (50.0, None)
    assert format_mean_std([12.5, 25.0]) == "18.8 ± 8.8" and format_mean_std([50.0]) == "50.0"
    with pytest.raises(ValueError):
        mean_std([])


def fabricated_results(top1):
    """Results as run_all returns them, with top-1 ``top1[variant][seed]`` for every head."""
    return [{"variant": name, "seed": seed, "seconds": 60.0, "reused": False,
             **{f"top1_{h}": value for h in ("text", "vc", "fused")}}
            for name, values in top1.items() for seed, value in enumerate(values)]


def test_the_report_tables_from_known_results():
    top1 = {"no_adapters": [12.5, 12.5, 12.5], "te": [40.0, 50.0, 60.0], "td": [70.0, 80.0, 90.0],
            "te_td": [90.0, 95.0, 100.0], "contrastive": [30.0, 30.0, 30.0], "contrastive_cmc": [40.0, 40.0, 40.0],
            "contrastive_cmc_cmlm": [40.0, 40.0, 40.0]}
    tables = ablate.table_rows(fabricated_results(top1))
    timing = {"wall_s": 600.0, "cpu_s": 900.0, "train_s": 1260.0, "load": ((3.0, 2.0, 1.0), (4.0, 3.0, 2.0)),
              "reused": 0, "runs": 21}
    import datetime
    md = report_markdown(tables, ["a setting"], timing, "python -m m2clip_fast.ablate",
                         datetime.datetime(2026, 12, 1, 14, 0), "a machine")
    lines = md.splitlines()
    assert "| TD only | ted_enhance=False | **80.0 ± 10.0** | fused | 70.0, 80.0, 90.0 | 80.0 ± 10.0 | 80.0 ± 10.0 " \
           "| 80.0 ± 10.0 | 81.8 |" in lines
    contrastive = next(line for line in lines if line.startswith("| contrastive |"))
    assert "**30.0 ± 0.0** | text |" in contrastive and contrastive.count("— (VC untrained)") == 2
    assert "Measured: TE + TD (95.0) > TD only (80.0) > TE only (50.0) > no adapters (12.5)." in lines
    assert ("Measured: + CMC + CMLM + VC (95.0) > + CMC (40.0) = + CMC + CMLM (40.0) > contrastive (30.0)."
            in lines)
    assert "Paper: TE + TD (83.4) > TE only (83.1) > TD only (81.8)." in lines
    assert any(line.startswith("TD alone beats TE alone here (80.0% against 50.0%)") for line in lines)
    assert "10.0 min wall for the whole command (21.0 min of it training" in md and "- a setting" in lines


def test_ordering_marks_ties_as_printed():
    rows = [ablate.table_rows(fabricated_results({n: [v] for n, v in zip(ablate.VARIANTS, [1, 2.04, 2.0, 3, 3, 3,
                                                                                             3])}))[0][1]][0]
    assert ordering(rows, lambda r: r.top1()[0]) == "TE + TD (3.0) > TE only (2.0) = TD only (2.0) > no adapters (1.0)"


def test_a_result_is_reused_only_for_the_same_command(tmp_path):
    variant = ablate.VARIANTS["td"]
    argv = ablate.run_argv(variant, 1, ablate.QUICK, tmp_path / "data", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ablate.RESULT).write_text(json.dumps({"argv": argv, "top1_text": 50.0}))
    assert ablate.finished_result(tmp_path / "run", argv)["top1_text"] == 50.0
    other = ablate.run_argv(variant, 2, ablate.QUICK, tmp_path / "data", tmp_path / "run")
    assert ablate.finished_result(tmp_path / "run", other) is None
    (tmp_path / "run" / ablate.RESULT).write_text("{not json")  # a torn write is no result
    assert ablate.finished_result(tmp_path / "run", argv) is None


@pytest.mark.slow
def test_quick_end_to_end_writes_the_report_then_reuses_and_resumes_runs(tmp_path, capsys):
    import matplotlib.image

    out, docs = tmp_path / "ablate", tmp_path / "docs"
    args = ["--quick", "--output-dir", str(out), "--report-dir", str(docs)]
    assert ablate.main(args) == 0
    md = (docs / "ablation.md").read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| row", "| no adapters", "| TE only", "| TD only", "| TE + TD",
                    "| row", "| contrastive", "| + CMC", "| + CMC + CMLM", "| + CMC + CMLM + VC"]
    assert "training seeds 0:" in md and "0 of 7 runs reused" in md
    image = matplotlib.image.imread(docs / "ablation.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(f"{name}_seed0" for name in ablate.VARIANTS)
    first = {r: json.loads((out / "runs" / r / ablate.RESULT).read_text()) for r in runs}

    capsys.readouterr()
    (out / "runs" / "td_seed0" / ablate.RESULT).unlink()  # as a run killed after its last checkpoint leaves it
    assert ablate.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused (finished earlier)") == 6 and "training TD only, seed 0" in printed
    resumed = json.loads((out / "runs" / "td_seed0" / ablate.RESULT).read_text())
    assert resumed["resumed"] and resumed["top1_fused"] == first["td_seed0"]["top1_fused"]
    assert "6 of 7 runs reused" in (docs / "ablation.md").read_text()


def test_an_unwritable_report_dir_fails_in_one_line_before_any_training(tmp_path, capsys):
    (tmp_path / "docs").write_text("a file, not a folder\n")
    args = ["--quick", "--output-dir", str(tmp_path / "ablate"), "--report-dir", str(tmp_path / "docs")]
    assert ablate.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m m2clip_fast.ablate: error: --report-dir {tmp_path / 'docs'}: cannot create it")
    assert not (tmp_path / "ablate").exists()


def test_the_load_reading_says_whether_other_jobs_shared_the_cores():
    from m2clip_fast.ablation_report import load_reading

    assert "no other job" in load_reading([(0.5, 0.4, 0.3), (1.3, 1.0, 0.8)], cores=2)
    assert "other jobs shared" in load_reading([(0.5, 0.4, 0.3), (11.0, 9.0, 7.0)], cores=2)
    assert "other jobs shared" in load_reading([(2.5, 0.4, 0.3), (1.0, 1.0, 0.8)], cores=2)
