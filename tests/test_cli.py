"""`llb-edge train` / `eval` through the real CLI: outputs, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from conftest import MTD, tiny_overrides
from typer.testing import CliRunner

from llb_edge.calibration import threshold_for_target
from llb_edge.cli import app

runner = CliRunner()


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_train_writes_a_complete_run_and_eval_reproduces_it(tmp_path):
    args = ["train", *sets(tiny_overrides(tmp_path / "cli", data__contamination=0.1))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "cli"
    for name in ("config.json", "metadata.json", "model.safetensors", "metrics.json", "train_list.jsonl",
                 "train_scores.json", "test_scores.jsonl"):
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == 4
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["iterations"] == 12 and config["data"]["contamination"] == 0.1
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["backbone"] == {"source": "random", "path": None, "sha256": None}
    assert metadata["input"] == {"resize": 64, "crop": 56} and metadata["iterations"] == 12
    train_list = [json.loads(line) for line in (run / "train_list.jsonl").read_text().splitlines()]
    calibration = json.loads((run / "calibration_scores.json").read_text())["scores"]
    assert len(train_list) == metadata["train_images"] and len(calibration) == metadata["calibration_images"] == 13
    assert len(train_list) + len(calibration) == 24 + int(0.1 * 24)  # contamination moved 2 defects in
    defects = [item for item in train_list if item["label"] == 1] + [p for p in calibration if "MT_Free" not in p]
    assert len(defects) == 2
    assert metadata["train_paths"] == [item["path"] for item in train_list]
    first = json.loads((run / "metrics.json").read_text())
    assert {"i_auroc", "p_auroc", "aupro", "i_f1max"} <= first.keys()

    again = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    second = json.loads((run / "metrics.json").read_text())
    for key in ("i_auroc", "p_auroc", "aupro"):
        assert second[key] == pytest.approx(first[key], abs=1e-6)

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "already holds a run" in refused.output and "--resume" in refused.output

    bundle = tmp_path / "bundle"
    exported = runner.invoke(app, ["export", str(run), "--out", str(bundle), "--precision", "fp32"])
    assert exported.exit_code == 0, exported.output
    assert "parity passed" in exported.output
    assert "false-reject rate on normal parts: target 0.01" in exported.output
    changed = runner.invoke(app, ["bundle", "set-threshold", str(bundle), "0.5", "--by", "shift-lead"])
    assert changed.exit_code == 0 and "is now 0.5" in changed.output and "expected false-reject rate" in changed.output
    shown = runner.invoke(app, ["bundle", "show", str(bundle)])
    assert shown.exit_code == 0 and "threshold 0.5 (operator; set by shift-lead" in shown.output
    scores = sorted(calibration.values())
    retargeted = runner.invoke(app, ["bundle", "set-threshold", str(bundle), "--target-frr", "0.2"])
    assert retargeted.exit_code == 0, retargeted.output
    threshold = json.loads((bundle / "bundle.json").read_text())["threshold"]
    # The conformal order statistic of the bundle's calibration scores (pinned in tests/test_calibration.py).
    assert threshold["value"] == threshold_for_target(scores, 0.2).threshold and threshold["frr"]["target"] == 0.2
    assert scores[0] < threshold["value"] <= scores[-1]
    assert threshold["method"] == "operator: target FRR 0.2"
    both = runner.invoke(app, ["bundle", "set-threshold", str(bundle), "0.5", "--target-frr", "0.1"])
    assert both.exit_code == 2 and "either" in both.output
    again = runner.invoke(app, ["export", str(run), "--out", str(bundle)])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.iteratons=5"], "unknown config key"),
        (["--data", "/nonexistent/mtd"], "/nonexistent/mtd"),
        (["--weights", "/nonexistent/w.safetensors", "--set", "model.encoder=test_tiny_patch14"], "does not exist"),
        (["--stages", "3"], "llb.stages"),
    ],
)
def test_bad_input_fails_with_a_message(tmp_path, extra, message):
    base = [] if "--data" in extra else ["--set", f"data.root={MTD}"]
    result = runner.invoke(app, ["train", "--name", "x", "--out-dir", str(tmp_path), *base, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_eval_of_a_missing_run_says_so(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "config.json is missing" in result.output


@pytest.mark.parametrize(
    "command",
    ["train", "eval", "export", "bundle", "serve", "replay", "watch", "ctl", "keys", "gateway", "bench", "retrain",
     "label", "promote", "rollback"],
)
def test_every_command_explains_itself(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
