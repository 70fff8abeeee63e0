"""benchmarks/gpu_report.py --dry-run: every section runs on the CPU with tiny shapes and reports every row,
the GPU-only ones as skipped (never with a number), in both the JSON and the markdown."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("adapter", "eager reference"), ("adapter", "official-style eager"), ("adapter", "torch.compile(reference)"),
        ("adapter", "fused Triton"), ("adapter", "bytes floor (roofline model)"),
        ("train", "official-style fp32"), ("train", "ours fp32"), ("train", "ours bf16"),
        ("loader", "PyAV"), ("loader", "DALI (GPU)"), ("loader", "DALI (CPU)")]
GPU_ONLY = {("adapter", "fused Triton"), ("loader", "DALI (GPU)")}


def dali_installed():
    sys.path.insert(0, str(ROOT))
    from m2clip_fast.data.dali import dali_available
    return dali_available()


@pytest.mark.slow  # three training-step worker processes and an inductor compile: minutes on the shared 2 cores
def test_dry_run_reports_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["dry_run"] is True and report["settings"]["device"] == "cpu"
    rows = {(r["section"], r["name"]): r for r in report["rows"]}
    assert [(r["section"], r["name"]) for r in report["rows"]] == ROWS
    for key in GPU_ONLY:
        assert rows[key]["status"].startswith("skipped: no CUDA") and not rows[key]["values"], rows[key]
    dali_cpu = rows[("loader", "DALI (CPU)")]
    assert dali_cpu["status"] == ("measured" if dali_installed() else "skipped: NVIDIA DALI not installed")

    for key in ROWS[:3]:  # checked against float64, then timed
        values = rows[key]["values"]
        assert rows[key]["status"] == "measured" and values["ms_fwd"] > 0 and values["ms_fwd_bwd"] > 0, key
        assert values["accuracy"].startswith("within 2x eager bf16 error")
        assert "x_vs_floor" not in values  # the model's floor is for the paper's shape, not the dry run's
    assert rows[("adapter", "eager reference")]["values"]["x_vs_official"] == pytest.approx(
        rows[("adapter", "official-style eager")]["values"]["ms_fwd_bwd"]
        / rows[("adapter", "eager reference")]["values"]["ms_fwd_bwd"])
    floor = rows[("adapter", "bytes floor (roofline model)")]
    # the same floor roofline.py prints for the fused design's forward+backward (µs)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline
    printed = [line.split() for line in roofline.report().splitlines() if line.startswith("fused ")]
    fwd_bwd_us = float(next(cols for cols in printed if cols[1] == "fwd+bwd")[7])
    assert floor["status"] == "model" and floor["values"]["ms_fwd_bwd"] * 1e3 == pytest.approx(fwd_bwd_us, abs=0.1)

    train = [rows[("train", name)] for name in ("official-style fp32", "ours fp32", "ours bf16")]
    for row in train:
        assert row["status"] == "measured" and row["values"]["batch"] == 2, row
        assert row["values"]["clips_per_s"] > 0 and row["values"]["peak_step_mb"] > 0
    assert train[0]["values"]["x_clips_per_s"] == pytest.approx(1.0)
    assert train[1]["values"]["loss_vs_official-style fp32"] <= 1e-4  # same function as the baseline
    assert train[2]["values"]["loss_vs_ours fp32"] <= 5e-2
    for name in ("PyAV", "DALI (CPU)") if dali_cpu["status"] == "measured" else ("PyAV",):
        values = rows[("loader", name)]["values"]
        # 4 videos in batches of 2, two epochs, the first batch untimed
        assert values["clips_per_s"] > 0 and values["timed_batches"] == 3 and values["codec"] == "vp9"

    md = (tmp_path / "gpu_report.md").read_text()
    assert "DRY RUN" in md
    for (section, name), row in rows.items():
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert line.endswith(f"| {row['status']} |"), line
        if (section, name) in GPU_ONLY:
            assert not re.search(r"\d", line.split("|")[2]), line  # no number in a skipped row
