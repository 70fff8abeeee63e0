"""``python -m m2clip_fast.selftest --device cpu --quick`` as a user runs it: a table, exit 0; and with
``--perturb`` (every fast-path result corrupted) every check that runs FAILs and the exit status is 1."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("TED adapter fwd+bwd", "attention sdpa", "attention math", "attention xformers",
          "tiny model training step", "DALI decode vs PyAV")


def _selftest(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this m2clip_fast
    proc = subprocess.run([sys.executable, "-m", "m2clip_fast.selftest", "--device", "cpu", "--quick", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = re.findall(r"^(.+?)\s{2,}(float32|bfloat16|float16|uint8)\s+(PASS|FAIL|SKIP)\s+[\d.]+s\s", proc.stdout, re.M)
    return proc, rows


def _names(rows):
    return {re.sub(r" \(.*\)$", "", name) for name, _, _ in rows}


@pytest.mark.slow
def test_selftest_passes_on_cpu():
    proc, rows = _selftest()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for lib in ("torch", "triton", "open_clip", "DALI", "xformers", "C++ extension", "GPU"):
        assert re.search(rf"^{re.escape(lib)}\s+\S", proc.stdout, re.M), lib
    assert _names(rows) == set(CHECKS)
    assert {dtype for _, dtype, _ in rows} >= {"float32", "bfloat16"}
    assert all(status in ("PASS", "SKIP") for _, _, status in rows)
    # the fused adapter really ran its C++ path (a silent fallback would compare the reference with itself)
    assert any(name == "TED adapter fwd+bwd (cpu)" and status == "PASS" for name, _, status in rows)
    # xformers is CUDA-only: skipped, with the reason
    assert all(status == "SKIP" for name, _, status in rows if name == "attention xformers")


@pytest.mark.slow
def test_perturbed_selftest_fails():
    proc, rows = _selftest("--perturb")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ran = [(name, status) for name, _, status in rows if status != "SKIP"]
    assert len(ran) >= 6 and all(status == "FAIL" for _, status in ran), proc.stdout
    # every compared tensor, not just the worst: "k of n tensors off" with k = n
    counts = re.findall(r"(\d+) of (\d+) tensors off", proc.stdout)
    assert len(counts) == len(ran) - 1 and all(k == n for k, n in counts), proc.stdout  # all but DALI
