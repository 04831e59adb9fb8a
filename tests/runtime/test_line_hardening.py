"""Issue 13, reproduced against real sockets: each attack as reported, now refused or fixed.

Control authentication and reload locations (item 1), key revocation on reload (3), bundle path
confinement and external-data checksums (4), whole-bundle validation before a swap (9), idle camera
expiry (11), rate-limited error logs (12), result sequence numbers against a slow subscriber (13),
and the health server's bounds on half-open connections (14).
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from runtime_harness import (
    Client,
    daemon_options,
    flat_frame,
    frame_parts,
    make_bundle,
    running_daemon,
    square_frame,
    wait_until,
)
from typer.testing import CliRunner

from llb_edge.bundle import MANIFEST_NAME, BundleError, hash_model_file, load_bundle
from llb_edge.cli import app
from llb_edge.protocol import ErrorCode
from llb_edge.runtime.control import ControlError, ControlKeys, send_control
from llb_edge.runtime.daemon import Daemon, ServeOptions
from llb_edge.runtime.health import HealthServer, MetricsRegistry
from llb_edge.runtime.keys import KeyPairFiles, generate_keypair
from llb_edge.runtime.logs import LOGGER_NAME, JsonFormatter

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)

DEFECT = square_frame(64, 64, (0, 0, 64, 64))  # white everywhere: score 0.5, the most defective frame


@dataclass
class Keys:
    server: KeyPairFiles
    camera: KeyPairFiles
    other_camera: KeyPairFiles
    operator: KeyPairFiles
    allowed: Path  # cameras' public keys
    operators: Path  # operators' public keys

    @property
    def options(self) -> dict[str, Path]:
        return {"curve_secret": self.server.secret, "curve_allowed": self.allowed, "control_allowed": self.operators}

    def control(self, pair: KeyPairFiles) -> ControlKeys:
        return ControlKeys(pair.secret, self.server.public)

    def client(self, daemon: Daemon, pair: KeyPairFiles, **kwargs: object) -> Client:
        return Client.of(daemon, curve_secret=pair.secret, server_public=self.server.public, **kwargs)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    folder = tmp_path / "keys"
    pairs = {name: generate_keypair(folder, name) for name in ("server", "camera", "other_camera", "operator")}
    allowed, operators = tmp_path / "allowed", tmp_path / "operators"
    allowed.mkdir()
    operators.mkdir()
    shutil.copy(pairs["camera"].public, allowed)
    shutil.copy(pairs["other_camera"].public, allowed)
    shutil.copy(pairs["operator"].public, operators)
    return Keys(allowed=allowed, operators=operators, **pairs)


# ------------------------------------------------------------------------------- item 1: control


def test_control_needs_an_operator_key_when_curve_is_on(bundle_dir: Path, keys: Keys) -> None:
    with running_daemon(bundle_dir, **keys.options) as daemon, keys.client(daemon, keys.camera) as camera:
        control = daemon.endpoints["control"]
        # The reported attack: a plain local client overrides the threshold. Now it gets no answer,
        # and neither does a camera (its key is allowed to send frames, not to control).
        for intruder in (None, keys.control(keys.camera)):
            with pytest.raises(ControlError):
                send_control(control, "threshold", value=1e9, timeout_s=1, keys=intruder)
        operator = keys.control(keys.operator)
        assert send_control(control, "threshold", keys=operator)["threshold"] == pytest.approx(0.1)

        # Even an operator cannot move the threshold outside the bundle's score range.
        for value in (1e9, -1.0, math.nan, math.inf):
            reply = send_control(control, "threshold", value=value, keys=operator)
            assert reply["ok"] is False and "threshold" in reply["error"]
        camera.send_frame("cam-a", 1, DEFECT)
        (header,) = camera.headers(1)
        assert header.decision == "NG" and header.threshold == pytest.approx(0.1)

        assert send_control(control, "threshold", value=0.45, keys=operator)["ok"] is True
        # `llb-edge ctl` authenticates with the operator's keys too.
        result = CliRunner().invoke(app, [
            "ctl", "threshold", "--endpoint", control,
            "--curve-secret", str(keys.operator.secret), "--curve-server", str(keys.server.public),
        ])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["threshold"] == 0.45


def test_control_off_loopback_needs_curve(keys: Keys) -> None:
    for endpoint in ("tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://eth0:5557", "tcp://192.168.1.10:5557"):
        with pytest.raises(ValueError, match="reachable from other machines"):
            ServeOptions(control=endpoint).validate()
    for endpoint in ("tcp://127.0.0.1:5557", "tcp://localhost:5557", "tcp://[::1]:5557", "ipc:///tmp/llb-ctl"):
        ServeOptions(control=endpoint).validate()
    ServeOptions(control="tcp://0.0.0.0:5557", **keys.options).validate()
    with pytest.raises(ValueError, match="control_allowed"):
        ServeOptions(curve_secret=keys.server.secret, curve_allowed=keys.allowed).validate()
    ServeOptions(curve_secret=keys.server.secret, curve_allowed=keys.allowed, control=None).validate()


def _error_without(reply: dict, path: str) -> str:
    assert reply["ok"] is False
    return reply["error"].replace(path, "PATH")


def test_reload_loads_only_from_configured_locations(tmp_path: Path, bundle_dir: Path, contract_onnx: Path) -> None:
    outside = make_bundle(tmp_path / "elsewhere", contract_onnx, model_version="evil", threshold=0.49)
    allowed_root = tmp_path / "incoming"
    good = make_bundle(allowed_root / "v2", contract_onnx, model_version="2")
    escape = allowed_root / "escape"
    escape.symlink_to(outside, target_is_directory=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the control socket")

    with running_daemon(bundle_dir, reload_allow=(allowed_root,)) as daemon:
        control = daemon.endpoints["control"]
        refusals = [
            _error_without(send_control(control, "reload", path=str(path)), str(path))
            for path in (outside, escape, secret, tmp_path / "missing", Path("/etc"), bundle_dir / ".." / "elsewhere")
        ]
        # Existing or not, file or folder, symlinked or not: one answer, no hash, nothing read.
        assert len(set(refusals)) == 1, refusals
        assert "reload locations" in refusals[0] and "sha256" not in refusals[0]
        assert daemon.status()["model"]["model_version"] == "1"

        reply = send_control(control, "reload", path=str(good))
        assert reply["ok"] is True and reply["model"]["model_version"] == "2"
        # Reloading the folder given at start stays allowed (e.g. after llb-edge bundle set-threshold).
        assert send_control(control, "reload", path=str(bundle_dir))["model"]["model_version"] == "1"


# ------------------------------------------------------------------------------- item 3: revocation


def test_a_removed_client_key_is_cut_off_on_reload(bundle_dir: Path, keys: Keys) -> None:
    with running_daemon(bundle_dir, **keys.options) as daemon, \
            keys.client(daemon, keys.camera) as revoked, keys.client(daemon, keys.other_camera) as kept:
        revoked.send_frame("cam-r", 1, flat_frame(32, 32))
        kept.send_frame("cam-k", 1, flat_frame(32, 32))
        assert revoked.headers(2) and kept.headers(2)  # both see both results

        (keys.allowed / keys.camera.public.name).unlink()
        reply = send_control(daemon.endpoints["control"], "reload", keys=keys.control(keys.operator))
        assert reply["ok"] is True
        messages = daemon.metrics.messages.total()

        # The revoked camera's connection is still open, but its frames are not read any more...
        for frame_id in range(2, 6):
            revoked.send_frame("cam-r", frame_id, DEFECT)
        wait_until(lambda: daemon.metrics.refused.value(socket="intake") == 4, what="refused frames")
        assert daemon.metrics.messages.total() == messages
        # ...and its subscription is dropped: the results socket was rebuilt and its key fails the
        # handshake, while the other camera reconnects and goes on.
        revoked.quiet(0.3)  # whatever was in flight before the rebuild (heartbeats every 0.05 s)
        kept.quiet(0.2)
        kept.wait_for_heartbeat()  # from the rebuilt socket: the subscription is live again
        kept.send_frame("cam-k", 2, DEFECT)
        (header,) = kept.headers(1)
        assert header.camera_id == "cam-k" and header.decision == "NG"
        heard = len(revoked.heartbeats)
        assert revoked.quiet(0.5) == [] and len(revoked.heartbeats) == heard
        assert "cam-r" not in [h.camera_id for h in kept.quiet(0.2)]

        # Operators are revoked the same way: the reload that drops the key is its last request.
        operator = keys.control(keys.operator)
        (keys.operators / keys.operator.public.name).unlink()
        assert send_control(daemon.endpoints["control"], "reload", keys=operator)["ok"] is True
        with pytest.raises(ControlError):
            send_control(daemon.endpoints["control"], "status", keys=operator, timeout_s=1)


# ---------------------------------------------------------------------------------- item 4: paths


def _rewrite_manifest(bundle: Path, **changes: object) -> None:
    values = json.loads((bundle / MANIFEST_NAME).read_text())
    for dotted, value in changes.items():
        target = values
        *parents, last = dotted.split("__")
        for name in parents:
            target = target[name]
        target[last] = value
    (bundle / MANIFEST_NAME).write_text(json.dumps(values))


def test_bundle_file_paths_cannot_leave_the_bundle_folder(
    tmp_path: Path, bundle_dir: Path, contract_onnx: Path
) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(contract_onnx, outside)
    sha = hash_model_file(tmp_path, "outside.onnx", "onnx")[0]
    hostile = {}
    for name, path in {"dotdot": "../../outside.onnx", "absolute": str(outside), "symlink": "link.onnx"}.items():
        hostile[name] = make_bundle(tmp_path / "allowed" / name, contract_onnx)
        (hostile[name] / "link.onnx").symlink_to(outside)
        _rewrite_manifest(hostile[name], files__onnx__path=path, files__onnx__sha256=sha)
        with pytest.raises(BundleError, match="bundle folder"):
            load_bundle(hostile[name])

    with running_daemon(bundle_dir, reload_allow=(tmp_path / "allowed",)) as daemon:
        for bundle in hostile.values():
            reply = send_control(daemon.endpoints["control"], "reload", path=str(bundle))
            assert reply["ok"] is False and "bundle folder" in reply["error"]
        assert daemon.status()["model"]["bundle"] == str(bundle_dir)


def _external_data_bundle(root: Path, contract_onnx: Path) -> Path:
    """The contract model with its float constants moved into an external-data file, recorded in
    bundle.json (TopK's K stays in the graph: ONNX Runtime needs it for shape inference)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(contract_onnx))
    for node in list(model.graph.node):
        if node.op_type == "Constant" and node.attribute[0].t.data_type == onnx.TensorProto.FLOAT:
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            model.graph.initializer.append(tensor)
            model.graph.node.remove(node)
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = root.parent / f"{root.name}.onnx"
    onnx.save_model(model, str(staged), save_as_external_data=True, location="weights.bin", size_threshold=0)
    bundle = make_bundle(root, staged)
    shutil.move(staged.parent / "weights.bin", bundle / "weights.bin")
    sha, external = hash_model_file(bundle, "model.onnx", "onnx")
    assert list(external) == ["weights.bin"]
    _rewrite_manifest(bundle, files__onnx__sha256=sha, files__onnx__external_data=external)
    return bundle


def test_onnx_external_data_is_checksummed(tmp_path: Path, bundle_dir: Path, contract_onnx: Path) -> None:
    external = _external_data_bundle(tmp_path / "allowed" / "external", contract_onnx)
    with running_daemon(bundle_dir, reload_allow=(tmp_path / "allowed",)) as daemon, Client.of(daemon) as client:
        control = daemon.endpoints["control"]
        reply = send_control(control, "reload", path=str(external))
        assert reply["ok"] is True, reply  # a real ORT session reading external data
        client.send_frame("cam-a", 1, flat_frame(64, 64))
        assert client.headers(1)[0].decision == "OK"

        # The reported attack: change one float in the data file (0.5 -> 0: every grey frame NG).
        data = bytearray((external / "weights.bin").read_bytes())
        half = np.float32(0.5).tobytes()
        assert data.count(half) >= 1
        start = bytes(data).index(half)
        data[start : start + 4] = np.float32(0.0).tobytes()
        (external / "weights.bin").write_bytes(bytes(data))
        reply = send_control(control, "reload")
        assert reply["ok"] is False and "weights.bin" in reply["error"] and "checksum" in reply["error"]
        client.send_frame("cam-a", 2, flat_frame(64, 64))
        assert client.headers(1)[0].decision == "OK"  # the verified model still serves

        # A bundle.json that does not list the external file is refused too.
        _rewrite_manifest(external, files__onnx__external_data={})
        reply = send_control(control, "reload")
        assert reply["ok"] is False and "does not checksum" in reply["error"]


# ------------------------------------------------------------------------------ item 9: validation


@pytest.mark.parametrize("threshold", [math.nan, "0.2", None, True, 1e9])
def test_a_broken_bundle_is_refused_and_the_old_model_keeps_serving(
    bundle_dir: Path, threshold: object
) -> None:
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        control = daemon.endpoints["control"]
        _rewrite_manifest(bundle_dir, threshold__value=threshold, model_version="broken")
        reply = send_control(control, "reload")
        assert reply["ok"] is False and "threshold" in reply["error"] and "still serving" in reply["error"]
        status = send_control(control, "status")
        assert status["model"]["model_version"] == "1" and status["model"]["threshold"] == pytest.approx(0.1)
        assert reply["model"] == status["model"]
        client.send_frame("cam-a", 1, DEFECT)
        client.send_frame("cam-a", 2, flat_frame(64, 64))
        assert [h.decision for h in client.headers(2)] == ["NG", "OK"]
        assert daemon.metrics.errors.total() == 0


# --------------------------------------------------------------------------------- item 11: cameras


def test_idle_cameras_give_their_slot_back(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir, max_cameras=2, camera_idle_s=0.5) as daemon, Client.of(daemon) as client:
        client.send_frame("cam-1", 1, flat_frame(32, 32))
        client.send_frame("cam-2", 1, flat_frame(32, 32))
        client.send_frame("cam-3", 1, flat_frame(32, 32))
        by_camera = {h.camera_id: h for h in client.headers(3)}
        assert by_camera["cam-3"].error.code is ErrorCode.TOO_MANY_CAMERAS
        assert by_camera["cam-1"].ok and by_camera["cam-2"].ok

        time.sleep(0.6)  # cam-1 and cam-2 go quiet: a new camera takes a freed slot at once
        client.send_frame("cam-3", 2, flat_frame(32, 32))
        (header,) = client.headers(1)
        assert header.ok and header.camera_id == "cam-3"
        wait_until(lambda: set(daemon.status()["queues"]) == {"cam-3"}, what="idle cameras expired")
        assert daemon.metrics.cameras_expired.total() == 2


# ------------------------------------------------------------------------------------- item 12: logs


def test_repeated_errors_are_logged_a_few_times_then_counted(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llb_edge.runtime.daemon as daemon_module

    real = daemon_module.inspection_result

    def failing(**kwargs: object) -> object:
        if str(kwargs["frame_id"]).startswith("bug"):
            raise ValueError("injected post-processing fault")
        return real(**kwargs)

    monkeypatch.setattr(daemon_module, "inspection_result", failing)
    window_s = 2.0
    monkeypatch.setattr(daemon_module, "ERROR_LOG_WINDOW_S", window_s)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    runtime_logger = logging.getLogger(LOGGER_NAME)
    runtime_logger.addHandler(handler)
    started = time.monotonic()
    try:
        with running_daemon(bundle_dir, queue_size=1000) as daemon, Client.of(daemon) as client:
            garbage, bugs = 1500, 60
            for index in range(garbage):
                client.send([b"{" * 2000 + str(index).encode()])  # unattributable BAD_HEADER
            for index in range(bugs):
                client.send_frame("cam-a", f"bug-{index}", flat_frame(32, 32))
            client.headers(bugs, timeout_s=30)
            wait_until(lambda: daemon.metrics.messages.total() == garbage + bugs, what="all messages read")
            time.sleep(window_s + 0.3)  # the last window ends; the next heartbeat writes the counts
    finally:
        runtime_logger.removeHandler(handler)
    windows = (time.monotonic() - started) / window_s + 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    frame_errors = [line for line in lines if line["event"] == "frame_error"]
    tracebacks = [line for line in lines if line["event"] == "postprocess_failed"]
    burst = daemon_module.ERROR_LOG_BURST
    assert 1 <= len(tracebacks) <= burst * windows and all("traceback" in line for line in tracebacks)
    assert len(frame_errors) <= 2 * burst * windows  # two codes (BAD_HEADER, INTERNAL)
    summaries = [line for line in lines if line["event"] == "log_suppressed"]
    suppressed = {}
    for line in summaries:
        suppressed[line["of_event"]] = suppressed.get(line["of_event"], 0) + line["suppressed"]
    assert suppressed["postprocess_failed"] + len(tracebacks) == bugs
    assert len(stream.getvalue()) < 100_000  # the report: 4.5 MB for 3000 messages


# ------------------------------------------------------------------------------------ item 13: seq


def test_result_seq_shows_what_a_slow_subscriber_lost(bundle_dir: Path) -> None:
    sent = 1000  # measured here: about 1 in 7 lost at 600
    options = {"queue_size": sent + 1, "results_hwm": 10, "map_payload": "float16"}
    with running_daemon(bundle_dir, **options) as daemon, Client.of(daemon, subscribe=False) as camera:
        slow = zmq.Context.instance().socket(zmq.SUB)
        slow.linger = 0
        slow.rcvhwm = 10
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.rcvtimeo = 5000
        slow.setsockopt(zmq.SUBSCRIBE, b"")
        slow.connect(daemon.endpoints["results"])

        def results(timeout_ms: int) -> list[int]:
            seqs = []
            while slow.poll(timeout_ms):
                parts = slow.recv_multipart()
                if parts[0] != b"hb":
                    seqs.append(json.loads(parts[1])["seq"])
            return seqs

        try:
            slow.recv_multipart()  # a heartbeat: subscribed; from now on it does not read
            slow.setsockopt(zmq.SUBSCRIBE, b"result/")
            slow.setsockopt(zmq.UNSUBSCRIBE, b"")  # heartbeats would keep the reader below busy
            for frame_id in range(sent):
                camera.send(frame_parts("cam-a", frame_id, flat_frame(32, 32)))
            answered = lambda: daemon.metrics.frames.total() + daemon.metrics.errors.total()  # noqa: E731
            wait_until(lambda: answered() == sent, timeout_s=40, what="every frame answered")
            seqs = results(300)
            camera.send_frame("cam-a", sent, flat_frame(32, 32))  # one more, once the reader keeps up
            seqs += results(1000)
        finally:
            slow.close()
    assert seqs[-1] == sent + 1, "the last result tells how many were published"
    assert len(seqs) < sent, "the slow subscriber lost nothing: the test did not reproduce the issue"
    assert seqs == sorted(set(seqs))
    gaps = sum(b - a - 1 for a, b in zip([0, *seqs], seqs, strict=False))
    assert gaps == sent + 1 - len(seqs)  # every lost result is counted from the gaps alone
    assert daemon.metrics.results_lost.total() == 0  # lost past the daemon: only seq can show it


# ---------------------------------------------------------------------------------- item 14: health


def test_health_server_drops_half_open_connections_and_caps_them() -> None:
    server = HealthServer(MetricsRegistry(), lambda: True, lambda: True, port=0, idle_timeout_s=0.5,
                          max_connections=8)
    server.start()
    host, port = server.url.removeprefix("http://").split(":")
    idle: list[socket.socket] = []
    try:
        for _ in range(300):  # the report: 300 half-open connections held 300 threads for 20 s
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        handlers = [t for t in threading.enumerate() if "process_request" in t.name]
        assert len(handlers) <= 8
        # Over the cap: closed at once. Within it: closed after the idle timeout.
        started = time.monotonic()
        for conn in idle:
            assert conn.recv(1) == b""
        assert time.monotonic() - started < 3
        with urllib.request.urlopen(server.url + "/live", timeout=5) as response:
            assert response.status == 200
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_the_daemon_health_server_is_bounded_by_default(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir, health_port=0) as daemon:
        assert daemon.health_url is not None
        from llb_edge.runtime.health import HEALTH_IDLE_TIMEOUT_S, HEALTH_MAX_CONNECTIONS

        assert 0 < HEALTH_IDLE_TIMEOUT_S <= 5 and HEALTH_MAX_CONNECTIONS <= 64
        host, port = daemon.health_url.removeprefix("http://").split(":")
        conns = [socket.create_connection((host, int(port)), timeout=10) for _ in range(100)]
        try:
            for conn in conns:
                assert conn.recv(1) == b""
        finally:
            for conn in conns:
                conn.close()
        with urllib.request.urlopen(daemon.health_url + "/ready", timeout=5) as response:
            assert response.status == 200


def test_serve_options_default_to_a_documented_camera_timeout() -> None:
    assert daemon_options().camera_idle_s == ServeOptions().camera_idle_s == 300.0


def test_a_bundle_without_a_score_range_takes_no_threshold_override(tmp_path: Path, contract_onnx: Path) -> None:
    bundle = make_bundle(tmp_path / "old-export", contract_onnx, extra={"score_range": None})
    with running_daemon(bundle) as daemon:
        reply = send_control(daemon.endpoints["control"], "threshold", value=0.2)
        assert reply["ok"] is False and "no score range" in reply["error"]
        assert daemon.status()["model"]["threshold"] == pytest.approx(0.1)


def test_external_data_is_found_in_subgraphs_and_garbage_is_refused() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from llb_edge.onnx_external import OnnxFormatError, external_data_locations

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(np.ones(4, np.float32), f"{name}_w")
        weight.data_location = TensorProto.EXTERNAL
        weight.ClearField("raw_data")
        for key, value in (("location", f"{name}.bin"), ("offset", "0"), ("length", "16")):
            weight.external_data.add(key=key, value=value)
        out = helper.make_tensor_value_info(f"{name}_w", TensorProto.FLOAT, [4])
        return helper.make_graph([], name, [], [out], [weight])

    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    result = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))
    model = helper.make_model(helper.make_graph([node], "g", [cond], [result]))
    assert sorted(external_data_locations(model.SerializeToString())) == ["else.bin", "then.bin"]
    for garbage in (b"\x0f\xff", b"\x3a\xff\xff\xff\xff\x0f", bytes(range(256))):
        with pytest.raises(OnnxFormatError):
            external_data_locations(garbage)
