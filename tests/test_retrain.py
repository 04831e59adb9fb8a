"""Retraining from the line: labels, versions (promote / rollback), the gate, and the whole loop end to end.

The end-to-end test serves a bundle exported from the tiny run through an in-process capturing daemon,
replays real MTD frames, retrains from the pool (LLB stages 1 and 2 with the tiny encoder), and
promotes while frames keep flowing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MTD

sys.path.insert(0, str(Path(__file__).parent / "runtime"))  # the daemon test harness lives there
from runtime_harness import Client, export_contract_model, make_bundle, running_daemon  # noqa: E402

from llb_edge.data.images import read_image_rgb  # noqa: E402
from llb_edge.pool import read_pool  # noqa: E402
from llb_edge.retrain import GateConfig, RetrainOptions, evaluate_gate, judge, retrain  # noqa: E402
from llb_edge.runtime.capture import CaptureOptions  # noqa: E402
from llb_edge.runtime.versions import (  # noqa: E402
    VersionError,
    current_bundle,
    current_version,
    list_versions,
    promote,
    read_history,
    resolve_bundle_dir,
    rollback,
    version_chain,
)
from llb_edge.trainer.label import LabelError, label_frames, read_labels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def contract_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_contract_model(tmp_path_factory.mktemp("contract") / "contract.onnx")


def write_pool(pool: Path, entries: list[dict]) -> None:
    """A pool written by hand: frames/<file> plus manifest lines."""
    (pool / "frames").mkdir(parents=True, exist_ok=True)
    with open(pool / "manifest.jsonl", "a") as handle:
        for entry in entries:
            (pool / "frames" / entry["file"]).write_bytes(b"png")
            handle.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------ labels


def test_labels_by_file_or_camera_frame_id_last_one_wins(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_pool(pool, [{"file": "a_cam1_7.png", "camera": "cam1", "frame_id": 7},
                      {"file": "b_cam1_8.png", "camera": "cam1", "frame_id": 8},
                      {"file": "c_cam2_x.png", "camera": "cam2", "frame_id": "lot/9"}])
    assert label_frames(pool, ["a_cam1_7.png", "cam2/lot/9"], "ng", by="op") == ["a_cam1_7.png", "c_cam2_x.png"]
    assert label_frames(pool, [str(pool / "frames" / "b_cam1_8.png"), "a_cam1_7"], "OK") == [
        "a_cam1_7.png", "b_cam1_8.png"]
    assert read_labels(pool) == {"a_cam1_7.png": "OK", "b_cam1_8.png": "OK", "c_cam2_x.png": "NG"}
    label_frames(pool, ["cam1/8"], None)
    assert read_labels(pool) == {"a_cam1_7.png": "OK", "c_cam2_x.png": "NG"}
    with pytest.raises(LabelError, match="cam1/99"):
        label_frames(pool, ["cam1/99"], "NG")
    with pytest.raises(LabelError, match="OK or NG"):
        label_frames(pool, ["cam1/7"], "maybe")
    lines = [json.loads(line) for line in (pool / "labels.jsonl").read_text().splitlines()]
    assert lines[0]["by"] == "op" and lines[0]["at"]


def test_read_pool_ignores_evicted_frames_and_keeps_unlisted_ones(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_pool(pool, [{"file": "1.png", "camera": "c", "p": 0.25, "reason": "sample"},
                      {"file": "2.png", "camera": "c", "p": 1.0, "reason": "ng"}])
    (pool / "frames" / "1.png").unlink()  # evicted
    (pool / "frames" / "0.png").write_bytes(b"png")  # renamed in, manifest line lost in a crash
    with open(pool / "manifest.jsonl", "a") as handle:
        handle.write('{"file": "3.pn')  # torn last line
    frames = read_pool(pool)
    assert [(f.file, f.camera, f.weight) for f in frames] == [("0.png", None, 1.0), ("2.png", "c", 1.0)]


# ---------------------------------------------------------------------------------------- versions


def test_promote_rollback_history_and_resolution(tmp_path: Path, contract_onnx: Path) -> None:
    root = tmp_path / "versions"
    bundles = [make_bundle(tmp_path / f"b{v}", contract_onnx, model_version=v) for v in ("1", "2", "3")]
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<html></html>")
    with pytest.raises(VersionError, match="no current version"):
        current_bundle(root)
    for bundle in bundles:
        change = promote(root, bundle, report if bundle.name == "b2" else None, reason=f"install {bundle.name}",
                         by="test")
        assert change.notified == {} and change.all_reloaded
    assert current_version(root) == "3" and list_versions(root) == ["1", "2", "3"]
    assert resolve_bundle_dir(root) == current_bundle(root) == root / "versions" / "3" / "bundle"
    assert resolve_bundle_dir(bundles[0]) == bundles[0]
    assert (root / "versions" / "2" / "report" / "report.html").is_file()
    assert not (root / "versions" / "1" / "report").exists()

    assert rollback(root, by="test", reason="too many NG").version == "2"
    assert rollback(root, by="test").version == "1"  # rollbacks walk the chain back
    with pytest.raises(VersionError, match="no previous version"):
        rollback(root)
    again = promote(root, bundles[2], by="test")  # already installed, same bundle: made current again
    assert again.version == "3" and again.previous == "1" and version_chain(root) == ["1", "3"]
    history = read_history(root)
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", "1", None), ("promote", "2", "1"), ("promote", "3", "2"), ("rollback", "2", "3"),
        ("rollback", "1", "2"), ("promote", "3", "1")]
    assert history[3]["reason"] == "too many NG" and history[3]["by"] == "test" and history[3]["at"]

    clash = make_bundle(tmp_path / "clash", contract_onnx, model_version="3", threshold=0.3)
    with pytest.raises(VersionError, match="already installed"):
        promote(root, clash)
    corrupt = make_bundle(tmp_path / "corrupt", contract_onnx, model_version="4")
    (corrupt / "model.onnx").write_bytes(b"edited")
    with pytest.raises(Exception, match="checksum"):
        promote(root, corrupt)
    assert current_version(root) == "3" and "4" not in list_versions(root)
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")]


def test_promote_reports_unreachable_daemons(tmp_path: Path, contract_onnx: Path) -> None:
    root = tmp_path / "versions"
    change = promote(root, make_bundle(tmp_path / "b", contract_onnx), notify_endpoints=["tcp://127.0.0.1:1"],
                     timeout_s=0.3)
    assert not change.all_reloaded and "no reply" in change.notified["tcp://127.0.0.1:1"]["error"]
    assert current_version(root) == "1"  # installed anyway: the daemon picks it up when it restarts


# -------------------------------------------------------------------------------------------- gate


def comparison(disagreement: float = 0.0, cur_ng: float = 0.1, cand_ng: float = 0.1, frames: int = 100,
               cur_labeled: dict | None = None, cand_labeled: dict | None = None) -> dict:
    return {"holdout": {"frames": frames}, "ng_rate_change": cand_ng - cur_ng, "disagreement": disagreement,
            "current": {"ng_rate": cur_ng, "labeled": cur_labeled or {}},
            "candidate": {"ng_rate": cand_ng, "labeled": cand_labeled or {}}}


def test_gate_checks() -> None:
    def failed(comp: dict, gate: GateConfig) -> set[str]:
        return {c.name for c in evaluate_gate(comp, gate) if not c.passed}

    assert failed(comparison(), GateConfig()) == set()
    assert failed(comparison(disagreement=0.01), GateConfig(max_disagreement=0.0)) == {"disagreement"}
    assert failed(comparison(cand_ng=0.15), GateConfig()) == {"ng_rate_change"}
    assert failed(comparison(cand_ng=0.05), GateConfig()) == {"ng_rate_change"}  # fewer NG is a change too
    assert failed(comparison(frames=10), GateConfig(min_holdout=30)) == {"min_holdout"}
    labeled = comparison(cur_labeled={"i_auroc": 0.9, "ng_recall": 1.0}, cand_labeled={"i_auroc": 0.95,
                                                                                       "ng_recall": 0.5})
    assert failed(labeled, GateConfig()) == {"labeled_ng_recall"}
    assert failed(labeled, GateConfig(max_labeled_drop=0.5)) == set()
    skipped = [c for c in evaluate_gate(comparison(), GateConfig()) if c.name == "labeled"]
    assert skipped[0].passed and "skipped" in skipped[0].detail


# ------------------------------------------------------------------------------------- end to end

TINY_RETRAIN = ["llb.stages=1,2", "llb.k=2", "llb.submodel_iterations=4", "train.iterations=8", "data.max_train=0"]


def mtd_frames(normal: int, defective: int) -> list[np.ndarray]:
    free = sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg"))[:normal]
    defects = sorted((MTD / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:defective]
    return [read_image_rgb(p) for p in [*free, *defects]]


class Collector(threading.Thread):
    """Reads every result from the client's SUB socket while frames stream (the socket is used by this
    thread only until it stops)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client, self.stop, self.headers = client, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            message = self.client._receive()
            if isinstance(message, tuple):
                self.headers.append(message[0])


@pytest.fixture(scope="module")
def served_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported as version "v1". The run is requested from here so that, when no earlier
    test has trained it yet, it trains on one thread too (a session fixture would start first)."""
    from llb_edge.exporters.bundle_export import export_bundle
    from llb_edge.exporters.export_options import ExportOptions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_run = request.getfixturevalue("tiny_run")
        out = tmp_path_factory.mktemp("served") / "v1"
        return export_bundle(tiny_run, out, ExportOptions(precisions=("fp32",), model_version="v1")).root
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_capture_retrain_gate_promote_rollback_end_to_end(served_bundle: Path, tmp_path: Path) -> None:
    exported = served_bundle
    root = tmp_path / "versions"
    promote(root, exported, reason="first install", by="test")
    pool = tmp_path / "pool"
    capture = CaptureOptions(pool_dir=pool, rate=1.0, camera_rates={"stream": 0.0}, queue_size=100, seed=0)
    images = mtd_frames(normal=32, defective=4)

    with running_daemon(root, capture=capture, queue_size=1000) as daemon, Client.of(daemon) as client:
        control = daemon.endpoints["control"]

        def version_of_next_frame(frame_id: int) -> str | None:
            client.send_frame("line", frame_id, images[0])
            (header,) = client.headers(1, timeout_s=10)
            return header.model_version

        # 1. Frames from the line fill the pool (every frame: rate 1).
        for frame_id, image in enumerate(images):
            client.send_frame("line", frame_id, image)
        headers = client.headers(len(images), timeout_s=30)
        assert all(h.ok and h.model_version == "v1" for h in headers)
        assert daemon.capture is not None and daemon.capture.wait_idle(20)
        assert len(read_pool(pool)) == len(images)
        label_frames(pool, ["line/32", "line/33"], "NG", by="test")
        label_frames(pool, ["line/0", "line/1"], "OK", by="test")

        # 2. Retrain; its gate fails (too few held-back frames, no disagreement allowed): nothing changes.
        failing = GateConfig(max_disagreement=0.0, min_holdout=10_000)
        decision = retrain(pool, root, tmp_path / "retrain", RetrainOptions(
            overrides=tuple(TINY_RETRAIN), gate=failing, holdout_fraction=0.25, seed=0, versions_root=root,
            notify_endpoints=(control,), precisions=("fp32",), threads=1, by="test"))
        assert not decision.passed and not decision.promoted
        assert any(reason.startswith("FAIL min_holdout") for reason in decision.reasons)
        assert current_version(root) == "v1" and version_of_next_frame(100) == "v1"
        report = decision.report_dir
        for name in ("report.html", "scores.png", "agreement.png", "comparison.json", "decision.json"):
            assert (report / name).is_file(), name
        saved = json.loads((report / "decision.json").read_text())
        assert saved["passed"] is False and saved["promoted"] is False and saved["gate"]["min_holdout"] == 10_000
        comp = json.loads((report / "comparison.json").read_text())
        assert comp["holdout"]["frames"] == 8 and comp["labeled_counts"] == {"OK": 2, "NG": 2}
        assert comp["pool"]["train"] == 24 and 0 < comp["pool"]["kept_by_llb"] < 24  # LLB stage 1 screened
        assert {"i_auroc", "accuracy", "ng_recall", "ok_pass"} <= set(comp["candidate"]["labeled"])
        # The pool file re-scored with the serving bundle gives the score the daemon published.
        assert comp["replay_check"]["frames"] == 8 and comp["replay_check"]["max_abs_diff"] < 1e-5
        stage1 = json.loads((decision.work_dir / "run" / "metadata.json").read_text())
        assert stage1["stages"] == ["1", "2"]

        # 3. Re-judged under a gate that passes: promoted while frames stream, none lost or doubled.
        collector = Collector(client)
        collector.start()
        sent: list[int] = []
        stop_stream = threading.Event()

        def stream() -> None:
            frame_id = 1000
            while not stop_stream.is_set():
                client.send_frame("stream", frame_id, images[frame_id % len(images)])
                sent.append(frame_id)
                frame_id += 1
                time.sleep(0.01)

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.3)
        passing = GateConfig(max_ng_rate_change=1.0, max_disagreement=1.0, max_labeled_drop=1.0, min_holdout=1)
        promoted = judge(decision.work_dir, RetrainOptions(gate=passing, versions_root=root,
                                                           notify_endpoints=(control,), by="test"))
        time.sleep(0.3)
        stop_stream.set()
        streamer.join(10)
        deadline = time.monotonic() + 20
        while len(collector.headers) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # anything extra (a duplicate) would arrive now
        collector.stop.set()
        collector.join(10)

        new = decision.candidate_version
        assert promoted.passed and promoted.promoted and promoted.promotion is not None
        assert promoted.promotion.all_reloaded and promoted.promotion.notified[control]["model_version"] == new
        assert current_version(root) == new
        assert sorted(h.frame_id for h in collector.headers) == sent  # every frame exactly once
        assert all(h.ok for h in collector.headers)
        versions = [h.model_version for h in sorted(collector.headers, key=lambda h: h.frame_id)]
        assert versions[0] == "v1" and versions[-1] == new
        assert versions == sorted(versions, key=lambda v: v == new)  # switched once, never back
        assert (root / "versions" / new / "report" / "report.html").is_file()
        assert json.loads((report / "decision.json").read_text())["promotion"]["version"] == new

        # 4. Rollback: the daemon serves the first version again.
        back = rollback(root, [control], reason="operator: test", by="test")
        assert back.version == "v1" and back.all_reloaded
        assert version_of_next_frame(2000) == "v1"

    assert [h["action"] for h in read_history(root)] == ["promote", "promote", "rollback"]


def real_pool(pool: Path, images: list[np.ndarray]) -> None:
    """A pool of real frames with capture metadata, as the daemon's capture writes it."""
    import cv2

    (pool / "frames").mkdir(parents=True)
    entries = []
    for frame_id, image in enumerate(images):
        name = f"line-{frame_id:06d}.png"
        cv2.imwrite(str(pool / "frames" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        entries.append({"file": name, "camera": "line", "frame_id": frame_id, "p": 0.5 if frame_id % 2 else 1.0})
    (pool / "manifest.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupted_retrain_resumes_from_its_snapshot_and_rejudges(served_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llb_edge.cli import app

    pool = tmp_path / "pool"
    real_pool(pool, mtd_frames(normal=20, defective=0))
    failing = GateConfig(max_disagreement=0.0, min_holdout=10_000)
    passing = GateConfig(max_ng_rate_change=1.0, max_disagreement=1.0, max_labeled_drop=1.0, min_holdout=1)
    options = RetrainOptions(precisions=("fp32",), threads=1, promote_if_passed=False)
    first = retrain(pool, served_bundle, tmp_path / "retrain", dataclasses.replace(
        options, overrides=tuple(TINY_RETRAIN), gate=failing, holdout_fraction=0.25))
    work, report = first.work_dir, first.report_dir
    model = work / "run" / "model.safetensors"
    trained_at = model.stat().st_mtime_ns
    before = json.loads((report / "comparison.json").read_text())

    # Killed after training, before export: and meanwhile the pool evicted every frame.
    shutil.rmtree(work / "candidate")
    for name in ("comparison.json", "decision.json"):
        (report / name).unlink()
    shutil.rmtree(pool)
    resumed = retrain(None, served_bundle, tmp_path / "retrain",
                      dataclasses.replace(options, gate=passing, resume_dir=work))
    assert resumed.work_dir == work and resumed.passed
    assert "train_s" not in resumed.timing and {"export_s", "compare_s"} <= set(resumed.timing)
    assert model.stat().st_mtime_ns == trained_at  # the finished training was not redone
    after = json.loads((report / "comparison.json").read_text())
    assert after["holdout"]["frames"] == before["holdout"]["frames"] == 5  # same held-back slice
    assert after["pool"]["train"] == before["pool"]["train"] == 15
    assert after["holdout"] == before["holdout"]  # same frames, same capture weights
    assert {f["file"]: f["candidate"] for f in after["frames"]} == pytest.approx(
        {f["file"]: f["candidate"] for f in before["frames"]}, abs=1e-6)  # the same trained model, re-exported
    assert sorted(f["p"] for f in json.loads((work / "data" / "snapshot.json").read_text())["unlabeled"]) == (
        [0.5] * 10 + [1.0] * 10)  # capture weights survive the pool

    # A finished cycle resumed from the CLI is decided again under the new gate, nothing recomputed.
    result = CliRunner().invoke(app, ["retrain", "--current", str(served_bundle), "--resume", str(work),
                                      "--min-holdout", "10000", "--no-promote"])
    assert result.exit_code == 1 and "FAILED" in result.output and "min_holdout" in result.output
    decision = json.loads((report / "decision.json").read_text())
    assert decision["passed"] is False and [d["passed"] for d in decision["earlier_decisions"]] == [True]
    assert "compare_s" not in decision["timing"]


def test_retrain_recipe_is_the_source_runs_config_with_typed_overrides(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from llb_edge.config import load_config, write_config
    from llb_edge.retrain import retrain_config

    source = tmp_path / "source-run"
    source.mkdir()
    write_config(load_config(None, ["model.encoder=test_tiny_patch14", "llb.k=4"]), source / "config.json")
    current = SimpleNamespace(manifest=SimpleNamespace(source_run=str(source)))
    cfg = retrain_config(current, None, ["train.iterations=7", "llb.keep=0.5"], tmp_path / "data", tmp_path / "w",
                         0.2, 3)
    assert (cfg.model.encoder, cfg.llb.k) == ("test_tiny_patch14", 4)  # from the source run
    assert (cfg.train.iterations, cfg.llb.keep_fraction) == (7, 0.5)  # the overrides, converted
    assert (cfg.data.dataset, cfg.data.test_fraction, cfg.data.split_seed) == ("folder", 0.2, 3)
