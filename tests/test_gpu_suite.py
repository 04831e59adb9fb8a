"""bench/gpu_suite.py --quick: the GPU suite runs end to end on CPU before a device is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MTD, REPO

PARTS = ("training", "inference", "serving", "parity", "metric")


@pytest.mark.slow
def test_quick_suite_writes_its_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--quick", "--out", str(out), "--data", str(MTD)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((out / "gpu_suite.json").read_text())
    table = (out / "gpu_suite.md").read_text()
    assert table.strip() in completed.stdout  # the table is printed
    assert record["quick"] is True and record["torch"] and record["date"] and record["device"].startswith("CPU")
    assert all(record["device"] in line for line in table.splitlines()[:1])
    for part in PARTS:
        result = record["parts"][part]
        assert "failed" not in result and "skipped" not in result, (part, result)
        assert f"| {part} |" in table

    training = record["parts"]["training"]["encoders"]["test_tiny_patch14"]
    assert training["ratio"] > 0 and training["pipeline_s"]["naive"] > 0
    inference = record["parts"]["inference"]["rows"]
    assert {(r["mode"], r["batch"]) for r in inference} == {("eager", 1), ("eager", 4)}
    assert all(r["images_per_s"] > 0 for r in inference)
    phases = record["parts"]["serving"]["phases"]
    assert phases[0]["backend"] == "torch-cpu" and phases[0]["ok"] > 0 and phases[0]["achieved_fps"] > 0
    parity = record["parts"]["parity"]
    assert parity["passed"] and parity["images"] == 4 and parity["defects"] == 2
    metric = record["parts"]["metric"]
    assert {"fp32", "bf16"} <= set(metric["runs"]) and "i_auroc" in metric["bf16_minus_fp32"]
