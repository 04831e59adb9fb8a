"""`llb-edge serve`: the line-side inspection daemon.

Threads and what they own (ZeroMQ sockets are not thread-safe, so each socket has one owner):

- intake reader: the PULL/SUB socket. Validates each message (llb_edge.protocol), decodes and
  resizes the image, and queues it in its camera's keep-newest queue. Bad messages become error
  results (when the camera and frame id are readable) and counters; nothing a sender does can
  stop the thread.
- inference: takes dynamic batches from the queues and runs the backend; each frame's outputs go to
  a pool of post workers (map resize, region search, encoding) so the next batch need not wait.
- post workers (``post_workers``): post-process inspected frames; the publisher sends their results
  in inspection order, whichever worker finishes first.
- publisher: the PUB socket. Sends results from an outbox queue and a heartbeat every interval.
- control: the REP socket (reload, status, threshold); with CURVE only operator keys get answers.
- health: HTTP /live /ready /metrics and the read-only operator page (runtime/operator_page.py),
  which post workers feed a reference per inspected frame; its images are drawn on HTTP threads.
- capture (optional, runtime/capture.py): writes a sampled fraction of inspected frames to a pool
  folder for `llb-edge retrain`; the inference thread only hands it a reference, never waits on it.

Hot reload: the new bundle (only from the configured reload locations) is loaded, validated and
self-checked on the control thread while the old model keeps serving; the swap is a single
reference assignment that the inference thread picks up at its next batch, so no frame is lost or
answered twice. The retired backend is closed by the inference thread between batches (never
while it may still be running on it). A reload also re-reads the allowed CURVE keys: a removed
key is refused from its next message on (each message's authenticated key is checked), and when a
subscriber key was removed the results endpoint is rebound, which drops every subscriber
connection so each must authenticate again.

Every published result carries ``seq``, counted per camera, so a consumer can count results lost
on the way (PUB drops silently for a slow subscriber); results the daemon itself could not publish
are counted in ``llb_results_lost_total``.

Shutdown (SIGTERM or stop()): stop taking control commands, stop reading (after draining what
already arrived on the socket), finish every queued frame, publish, flush, exit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import queue
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zmq

from llb_edge.bundle import Bundle, BundleError, load_bundle
from llb_edge.calibration import CalibrationError, bundle_calibration_scores, estimate_frr
from llb_edge.data.transforms import Geometry
from llb_edge.errors import LLBEdgeError
from llb_edge.protocol import (
    DECISION_NG,
    MAX_HEADER_BYTES,
    ErrorCode,
    FrameHeader,
    Heartbeat,
    ProtocolError,
    decode_frame,
    encode_heartbeat,
    encode_result,
)
from llb_edge.runtime.backends import Backend, create_backend, self_check
from llb_edge.runtime.capture import FrameCapture
from llb_edge.runtime.control import ControlRequest, parse_control_request
from llb_edge.runtime.drift import NgRateMonitor
from llb_edge.runtime.frames import (
    Frame,
    FrameQueues,
    decode_frame_image,
)
from llb_edge.runtime.health import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    HealthServer,
    MetricsRegistry,
)
from llb_edge.runtime.keys import (
    CONTROL_ZAP_DOMAIN,
    ZAP_DOMAIN,
    ClientAllowList,
    configure_server,
    message_user_id,
)
from llb_edge.runtime.logs import RateLimitedLog, configure_json_logging, get_logger, log_event
from llb_edge.runtime.operator_page import OperatorPage
from llb_edge.runtime.postprocess import ModelIdentity, error_result, inspection_result, top_fraction_of
from llb_edge.runtime.serve_options import ServeOptions
from llb_edge.runtime.versions import resolve_bundle_dir

POLL_MS = 100  # how often blocked threads look at their stop flag
OUTBOX_LIMIT = 10_000  # results waiting for the publisher; PUB never blocks, so this stays near 0
DRAIN_LIMIT = 10_000  # messages read from the intake socket after a stop request
FLUSH_LINGER_MS = 1000  # time given to ZeroMQ to put the last results on the wire at shutdown
ERROR_LOG_WINDOW_S = 10.0  # repeated errors of one kind: ERROR_LOG_BURST lines in full per window,
ERROR_LOG_BURST = 5  # then one line with the count of the others
REBIND_WAIT_S = 2.0  # how long the publisher waits for the results port to be free again
SEQUENCE_CAMERAS = 4096  # cameras whose result seq is remembered (least recently published forgotten)

logger = get_logger("daemon")
T = TypeVar("T")


@dataclass(frozen=True)
class ServingModel:
    """A loaded, self-checked model and the settings results are computed with."""

    bundle: Bundle
    backend: Backend
    geometry: Geometry
    threshold: float
    identity: ModelIdentity
    top_fraction: float  # of map cells the score averages: rescoring inside a region-of-interest mask
    calibration: tuple[float, ...] | None  # the bundle's calibration scores: the expected NG rate of any threshold
    threshold_override: bool = False

    @property
    def expected_ng_rate(self) -> float | None:
        """The NG rate the bundle's calibration images predict at the threshold in use.

        Every calibration image counts, its suspected defects included (no outlier cut): the slice is
        a random draw of the parts, so the line's defects are NG here too and the drift alarm must not
        take them for drift."""
        if self.calibration is None:
            return None
        return estimate_frr(self.calibration, self.threshold, outlier_z=None).expected

    def describe(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle.root),
            "model_id": self.identity.model_id,
            "model_version": self.identity.model_version,
            "backend": self.identity.backend,
            "threshold": self.threshold,
            "threshold_override": self.threshold_override,
            "expected_ng_rate": self.expected_ng_rate,
            "score_range": self.bundle.score_range,
            "score_stats": self.bundle.manifest.score_stats,
            "input_size": self.geometry.crop,
            "map_size": self.bundle.manifest.map_size,
        }


def load_serving_model(bundle_dir: str | Path, options: ServeOptions) -> ServingModel:
    """Load a bundle (checksums verified), create its backend and self-check it; raises if unusable.

    ``bundle_dir`` may also be a versions root (runtime/versions.py): its current version is loaded,
    so a reload without a path follows `llb-edge promote` / `rollback`.
    """
    bundle = load_bundle(resolve_bundle_dir(bundle_dir), verify=True)
    manifest = bundle.manifest
    geometry = Geometry(resize=manifest.preprocessing.resize, crop=manifest.preprocessing.crop)
    try:
        calibration = bundle_calibration_scores(manifest.extra)
    except CalibrationError as err:
        raise BundleError(f"bundle {bundle.root}: {err}") from err
    backend = create_backend(bundle, options.backend, max_batch=options.max_batch, intra_op_threads=options.ort_threads)
    try:
        self_check(backend, geometry.crop, manifest.map_size)
    except Exception:
        backend.close()
        raise
    return ServingModel(
        bundle=bundle,
        backend=backend,
        geometry=geometry,
        threshold=bundle.threshold,
        identity=ModelIdentity(manifest.model_id, manifest.model_version, backend.name),
        top_fraction=top_fraction_of(bundle),
        calibration=tuple(calibration) if calibration is not None else None,
    )


Outgoing = list[Any] | Future  # encoded message parts, or a result still being post-processed


@dataclass(frozen=True)
class InspectedFrame:
    """One frame's share of a batch's backend outputs, handed from inference to a post worker."""

    frame: Frame
    model: ServingModel
    anomaly_map: np.ndarray
    score: float
    score_max: float
    infer_started: float  # perf_counter when its batch went into the backend
    infer_s: float


class DaemonMetrics:
    """The daemon's Prometheus metrics (names documented in docs/protocol.md)."""

    def __init__(self) -> None:
        self.registry = MetricsRegistry()
        r = self.registry
        self.messages = r.counter("llb_messages_received_total", "Messages read from the intake socket")
        self.frames = r.counter("llb_frames_inspected_total", "Frames inspected", ["camera", "decision"])
        self.errors = r.counter("llb_errors_total", "Frames or messages that got no inspection", ["code"])
        self.drops = r.counter("llb_frames_dropped_total", "Frames replaced by newer ones (keep-newest)", ["camera"])
        self.results_lost = r.counter(
            "llb_results_lost_total", "Results the daemon could not publish", ["reason"]
        )
        self.refused = r.counter(
            "llb_messages_refused_total", "Messages from a CURVE key no longer allowed", ["socket"]
        )
        self.cameras_expired = r.counter("llb_cameras_expired_total", "Idle cameras that gave up their slot")
        self.queue_depth = r.gauge("llb_queue_depth", "Frames waiting per camera", ["camera"])
        self.batch_size = r.histogram("llb_batch_size", "Frames per inference batch", BATCH_BUCKETS)
        self.latency = r.histogram(
            "llb_stage_latency_seconds", "Per-frame latency by stage", LATENCY_BUCKETS, ["stage"]
        )
        self.model_info = r.gauge("llb_model_info", "The model being served", ["model_id", "model_version", "backend"])
        self.threshold = r.gauge("llb_threshold", "Decision threshold in use")
        self.reloads = r.counter("llb_reloads_total", "Bundle reloads", ["outcome"])
        self.ready = r.gauge("llb_ready", "1 while serving")


class ReloadRefusedError(LLBEdgeError, ValueError):
    """A reload of a path outside the daemon's reload locations; the message reveals nothing about it."""


class ResultSequences:
    """Per-camera result sequence numbers (1, 2, ...), for the ``seq`` field of results.

    Bounded: beyond ``limit`` cameras the least recently published one is forgotten, and its
    numbering restarts at 1 (as it does after a daemon restart). Callers serialise access.
    """

    def __init__(self, limit: int = SEQUENCE_CAMERAS) -> None:
        self._limit = limit
        self._last: collections.OrderedDict[str, int] = collections.OrderedDict()

    def next(self, camera_id: str) -> int:
        seq = self._last.pop(camera_id, 0) + 1
        self._last[camera_id] = seq
        if len(self._last) > self._limit:
            self._last.popitem(last=False)
        return seq


def _received(receive: Callable[[], T], stop: threading.Event, error_event: str) -> Iterator[T]:
    """Messages from a socket until ``stop`` is set. ``receive`` times out (zmq.Again) every POLL_MS so
    ``stop`` is seen; a socket error is logged as ``error_event`` and retried after a poll interval."""
    while not stop.is_set():
        try:
            message = receive()
        except zmq.Again:
            continue
        except zmq.ZMQError as err:
            log_event(logger, logging.ERROR, error_event, error=str(err))
            time.sleep(POLL_MS / 1000)
            continue
        yield message


class Daemon:
    """The serving core. ``Daemon(bundle, options).start()``, then ``stop()``; usable as a context."""

    def __init__(self, bundle_dir: str | Path, options: ServeOptions | None = None) -> None:
        self.options = options or ServeOptions()
        self.options.validate()
        self.bundle_dir = Path(bundle_dir)
        self.metrics = DaemonMetrics()
        self.endpoints: dict[str, str] = {}
        self.health_url: str | None = None
        self._context = zmq.Context()
        self._queues = FrameQueues(self.options.queue_size, self.options.max_cameras, self.options.camera_idle_s)
        self._outbox: queue.Queue[Outgoing | None] = queue.Queue(maxsize=OUTBOX_LIMIT)
        # Taken while a result gets its seq and enters the outbox, so seq order is publication order.
        self._outbox_lock = threading.Lock()
        self._sequences = ResultSequences()
        self._rebind_results_due = threading.Event()  # a subscriber key was revoked
        # Reloads load bundles from inside these folders only (resolved once, at start).
        self._reload_roots = [self.bundle_dir.resolve(), *(Path(p).resolve() for p in self.options.reload_allow or ())]
        self._post_pool = ThreadPoolExecutor(self.options.post_workers, thread_name_prefix="llb-post")
        # One batch may wait for post-processing beside the ones being post-processed: when
        # post-processing is the bottleneck the inference thread then waits, frames gather in the
        # camera queues and the next batch is a full one (batch-1 inference would waste compute).
        self._post_slots = threading.Semaphore(self.options.post_workers + self.options.max_batch)
        self._model: ServingModel | None = None
        self._retired: list[ServingModel] = []
        self._swap_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._stop_control = threading.Event()
        self._stop_intake = threading.Event()
        self._stop_inference = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._health: HealthServer | None = None
        self._allow_list: ClientAllowList | None = None
        self._state = "starting"
        self._started_at = time.monotonic()
        self._heartbeat_seq = 0
        self._error_log = RateLimitedLog(logger, ERROR_LOG_WINDOW_S, ERROR_LOG_BURST)
        self.metrics.registry.add_collector(self._collect_gauges)
        self.ng_rates = NgRateMonitor(self.metrics.registry, logger, self.options.ng_rate_window,
                                      self.options.ng_rate_alpha)
        self.capture: FrameCapture | None = None
        if self.options.capture.enabled:
            self.capture = FrameCapture(self.options.capture, self.metrics.registry)
        self.page: OperatorPage | None = None
        if self.options.health_port is not None:
            self.page = OperatorPage(self.status, lambda: self._model.bundle if self._model is not None else None)

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> Daemon:
        """Load the bundle, bind the sockets, start the threads. Raises if the bundle is unusable."""
        sockets: list[zmq.Socket] = []
        try:
            self._set_model(load_serving_model(self.bundle_dir, self.options))
            if self.capture is not None:
                self.capture.start()  # an unusable pool folder is a configuration error: refuse to start
            if self.options.curve_allowed is not None:
                folders = {ZAP_DOMAIN: self.options.curve_allowed}
                if self.options.control_allowed is not None:
                    folders[CONTROL_ZAP_DOMAIN] = self.options.control_allowed
                self._allow_list = ClientAllowList(self._context, folders)
            intake = self._intake_socket()
            sockets.append(intake)
            results = self._results_socket()
            sockets.append(results)
            control = self._control_socket() if self.options.control else None
            if control is not None:
                sockets.append(control)
            if self.options.health_port is not None:
                self._health = HealthServer(
                    self.metrics.registry,
                    self.is_live,
                    self.is_ready,
                    self.options.health_host,
                    self.options.health_port,
                    pages=self.page.handle if self.page is not None else None,
                )
                self.health_url = self._health.url
        except BaseException:
            for sock in sockets:
                sock.close(linger=0)
            if self.capture is not None:
                self.capture.stop(1.0)
            self._post_pool.shutdown(wait=False)
            self._shutdown_resources()
            self._stopped.set()
            raise
        self._threads = [
            threading.Thread(target=self._intake_loop, args=(intake,), name="llb-intake", daemon=True),
            threading.Thread(target=self._inference_loop, name="llb-inference", daemon=True),
            threading.Thread(target=self._publish_loop, args=(results,), name="llb-publisher", daemon=True),
        ]
        if control is not None:
            self._threads.append(
                threading.Thread(target=self._control_loop, args=(control,), name="llb-control", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        if self._health is not None:
            self._health.start()
        self._state = "serving"
        log_event(
            logger,
            logging.INFO,
            "serving",
            **self.endpoints,
            health=self.health_url,
            **self._model_or_raise().describe(),
        )
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: finish and publish every frame already received, then release everything."""
        if self._stopped.is_set():
            return
        self._state = "stopping"
        deadline = time.monotonic() + timeout_s
        queued_at_stop = self._queues.total()
        self._stop_control.set()
        self._join("llb-control", deadline)
        self._stop_intake.set()
        self._join("llb-intake", deadline)
        self._queues.close()
        self._stop_inference.set()
        self._join("llb-inference", deadline)
        with contextlib.suppress(queue.Full):
            self._outbox.put(None, timeout=max(0.1, deadline - time.monotonic()))
        self._join("llb-publisher", deadline)
        self._post_pool.shutdown(wait=True)
        if self.capture is not None:
            self.capture.stop(max(0.1, deadline - time.monotonic()))
        self._shutdown_resources()
        self._stopped.set()
        log_event(logger, logging.INFO, "stopped", queued_at_stop=queued_at_stop, **self._totals())

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _join(self, name: str, deadline: float) -> None:
        for thread in self._threads:
            if thread.name == name:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log_event(logger, logging.ERROR, "thread_did_not_stop", thread=name)

    def _shutdown_resources(self) -> None:
        if self._health is not None:
            self._health.stop()
        if self._allow_list is not None:
            self._allow_list.stop()
        with self._swap_lock:
            models = [*self._retired, *([self._model] if self._model else [])]
            self._retired.clear()
        for model in models:
            model.backend.close()
        # term() waits for every socket to be closed by its thread; a thread that did not stop
        # (logged by _join) would make it wait forever, so the process exit reclaims them instead.
        if not any(thread.is_alive() for thread in self._threads):
            self._context.term()

    # ------------------------------------------------------------------------------ sockets

    def _bind(self, sock: zmq.Socket, endpoint: str, role: str) -> None:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as err:
            raise OSError(f"cannot bind the {role} socket to {endpoint}: {err}") from err
        self.endpoints[role] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _secure(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        if self.options.curve_secret is not None:
            configure_server(sock, self.options.curve_secret, domain)

    def _authorised(self, frame: zmq.Frame, domain: str, socket_name: str) -> bool:
        """Whether a received message's authenticated key is (still) allowed; always True without CURVE."""
        if self._allow_list is None:
            return True
        if self._allow_list.is_allowed(domain, message_user_id(frame)):
            return True
        self.metrics.refused.inc(socket=socket_name)
        self._error_log.log(logging.WARNING, f"refused-{socket_name}", "message_refused", socket=socket_name,
                            reason="client key not allowed (removed from its folder?)")
        return False

    def _intake_socket(self) -> zmq.Socket:
        options = self.options
        sock = self._context.socket(zmq.PULL if options.intake_mode == "pull" else zmq.SUB)
        sock.linger = 0
        sock.rcvtimeo = POLL_MS
        sock.rcvhwm = options.intake_hwm
        # Refuse absurd parts inside ZeroMQ, before they are allocated; sizes between the
        # protocol limit and this one are answered with TOO_LARGE results.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * options.max_payload_bytes + MAX_HEADER_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if options.intake_mode == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._secure(sock)
        if options.intake_connect:
            sock.connect(options.intake)
            self.endpoints["intake"] = options.intake
        else:
            self._bind(sock, options.intake, "intake")
        return sock

    def _results_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.PUB)
        sock.linger = 0
        sock.sndhwm = self.options.results_hwm
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self._secure(sock)
        self._bind(sock, self.options.results, "results")
        return sock

    def _control_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.REP)
        sock.linger = 0
        sock.rcvtimeo = POLL_MS
        sock.sndtimeo = 1000
        assert self.options.control is not None
        self._secure(sock, CONTROL_ZAP_DOMAIN)
        self._bind(sock, self.options.control, "control")
        return sock

    # ------------------------------------------------------------------------------- intake

    def _intake_loop(self, sock: zmq.Socket) -> None:
        for parts in _received(lambda: sock.recv_multipart(copy=False), self._stop_intake, "intake_socket_error"):
            if self._authorised(parts[0], ZAP_DOMAIN, "intake"):
                self._accept(parts)
        # Frames that already reached the socket count as in flight: answer them too.
        for _ in range(DRAIN_LIMIT):
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                break
            if self._authorised(parts[0], ZAP_DOMAIN, "intake"):
                self._accept(parts)
        sock.close(linger=0)

    def _accept(self, parts: list[Any]) -> None:
        """Validate, decode and queue one message; every failure is answered or counted, never raised."""
        received = time.perf_counter()
        self.metrics.messages.inc()
        header: FrameHeader | None = None
        try:
            header, payload = decode_frame(parts, self.options.max_payload_bytes)
            geometry = self._model_or_raise().geometry
            image = decode_frame_image(header, payload, self.options.max_pixels)
            roi = self.options.regions.get(header.camera_id)
            misfit = roi.misfit(*image.shape[:2]) if roi is not None else None
            if misfit is not None:
                raise ProtocolError(ErrorCode.BAD_SHAPE, misfit, camera_id=header.camera_id, frame_id=header.frame_id)
            frame = Frame(
                header=header,
                image=image,
                model_input=geometry.to_model_input(roi.cut(image) if roi is not None else image),
                geometry=geometry,
                roi=roi,
                received=received,
                decode_s=time.perf_counter() - received,
            )
            evicted = self._queues.put(frame)
            if evicted is not None:
                self.metrics.drops.inc(camera=evicted.header.camera_id)
                dropped = evicted.header
                self._answer_error(
                    ErrorCode.DROPPED,
                    f"replaced by a newer frame (queue of {self.options.queue_size} full)",
                    dropped.camera_id, dropped.frame_id, dropped.capture_ts,
                )
        except ProtocolError as err:
            if err.attributable:
                assert err.camera_id is not None and err.frame_id is not None
                self._answer_error(err.code, err.message, err.camera_id, err.frame_id, err.capture_ts)
            else:
                self._count_error(err.code, err.message, err.camera_id, err.frame_id)
        except Exception as err:  # noqa: BLE001 - a bug must not take the intake down
            self._log_failure("intake_internal_error", err)
            if header is not None:
                self._answer_error(ErrorCode.INTERNAL, f"internal error: {err!r}",
                                   header.camera_id, header.frame_id, header.capture_ts)
            else:
                self._count_error(ErrorCode.INTERNAL, repr(err), None, None)

    def _log_failure(self, event: str, err: BaseException, **fields: Any) -> None:
        """A traceback for the first few failures of a kind, then counts (a per-frame bug floods logs)."""
        self._error_log.log(
            logging.ERROR, f"{event}:{type(err).__name__}", event, exc_info=err, error=repr(err), **fields
        )

    def _count_error(self, code: ErrorCode, message: str, camera_id: str | None, frame_id: int | str | None) -> None:
        self.metrics.errors.inc(code=code.name)
        self._error_log.log(
            logging.WARNING,
            code.name,
            "frame_error",
            code=code.name,
            message=message,
            camera_id=camera_id,
            frame_id=frame_id,
        )

    def _answer_error(
        self, code: ErrorCode, message: str, camera_id: str, frame_id: int | str, capture_ts: float | None
    ) -> None:
        """Count a frame's error and queue its error result for publishing."""
        self._count_error(code, message, camera_id, frame_id)
        self._publish(camera_id, functools.partial(self._error_parts, code, message, camera_id, frame_id, capture_ts))

    def _error_parts(
        self, code: ErrorCode, message: str, camera_id: str, frame_id: int | str, capture_ts: float | None, seq: int
    ) -> list[Any]:
        """The encoded error result of a frame, for the outbox sequence number ``seq``."""
        identity = self._model.identity if self._model is not None else None
        result = error_result(camera_id, frame_id, capture_ts, code, message, identity)
        return encode_result(dataclasses.replace(result, published_ts=time.time(), seq=seq))

    # ---------------------------------------------------------------------------- inference

    def _inference_loop(self) -> None:
        max_wait_s = self.options.max_wait_ms / 1000
        while True:
            self._close_retired()
            batch = self._queues.take_batch(self.options.max_batch, max_wait_s)
            if batch:
                self._process(batch)
            elif self._stop_inference.is_set():
                break
        self._close_retired()

    def _process(self, batch: list[Frame]) -> None:
        model = self._model_or_raise()
        started = time.perf_counter()
        try:
            inputs = np.stack([frame.input_for(model.geometry) for frame in batch])
            maps, scores, maxes = model.backend.run(inputs)
        except Exception as err:  # noqa: BLE001 - answer the frames, keep serving
            self._log_failure("inference_failed", err, batch=len(batch))
            for frame in batch:
                header = frame.header
                self._answer_error(ErrorCode.INFERENCE_FAILED, f"inference failed: {err}",
                                   header.camera_id, header.frame_id, header.capture_ts)
            return
        infer_s = time.perf_counter() - started
        self.metrics.batch_size.observe(len(batch))
        for index, frame in enumerate(batch):
            inspected = InspectedFrame(
                frame, model, maps[index], float(scores[index]), float(maxes[index]), started, infer_s
            )
            # Blocks while post-processing lags behind inference: the backlog then stays in the
            # bounded camera queues (keep-newest) instead of growing here.
            self._post_slots.acquire()
            try:
                # The outbox is FIFO: results leave in inspection order.
                self._publish(frame.header.camera_id, functools.partial(self._submit_post, inspected))
            except BaseException:
                self._post_slots.release()
                raise

    def _submit_post(self, inspected: InspectedFrame, seq: int) -> Future:
        return self._post_pool.submit(self._finish, inspected, seq)

    def _finish(self, inspected: InspectedFrame, seq: int) -> list[Any]:
        """Post-process one inspected frame on a post worker; returns the encoded result (never raises)."""
        header = inspected.frame.header
        try:
            return self._finish_frame(inspected, seq)
        except Exception as err:  # noqa: BLE001 - every frame gets an answer
            self._log_failure("postprocess_failed", err, camera_id=header.camera_id, frame_id=header.frame_id)
            message = f"post-processing failed: {err!r}"
            self._count_error(ErrorCode.INTERNAL, message, header.camera_id, header.frame_id)
            return self._error_parts(ErrorCode.INTERNAL, message, header.camera_id, header.frame_id,
                                     header.capture_ts, seq)
        finally:
            self._post_slots.release()

    def _finish_frame(self, inspected: InspectedFrame, seq: int) -> list[Any]:
        post_started = time.perf_counter()
        frame, model, header = inspected.frame, inspected.model, inspected.frame.header
        map_encoding = None if self.options.map_payload == "none" else self.options.map_payload
        result, payload = inspection_result(
            camera_id=header.camera_id,
            frame_id=header.frame_id,
            capture_ts=header.capture_ts,
            anomaly_map=inspected.anomaly_map,
            score=inspected.score,
            score_max=inspected.score_max,
            threshold=model.threshold,
            geometry=model.geometry,
            height=frame.height,
            width=frame.width,
            identity=model.identity,
            map_encoding=map_encoding,
            roi=frame.roi,
            top_fraction=model.top_fraction,
        )
        done = time.perf_counter()
        latency_s = {
            "decode": frame.decode_s,
            "queue": inspected.infer_started - frame.enqueued,
            "infer": inspected.infer_s,
            "post": done - post_started,
            "total": done - frame.received,
        }
        for stage, seconds in latency_s.items():
            self.metrics.latency.observe(seconds, stage=stage)
        result = dataclasses.replace(
            result,
            latency_ms={stage: round(seconds * 1000, 3) for stage, seconds in latency_s.items()},
            published_ts=time.time(),
            seq=seq,
        )
        if result.error is not None:
            self._count_error(result.error.code, result.error.message, header.camera_id, header.frame_id)
        else:
            self.metrics.frames.inc(camera=header.camera_id, decision=str(result.decision))
            self.ng_rates.record(header.camera_id, result.decision == DECISION_NG)
            if self.page is not None:
                # Regions follow the image threshold in use, so the overlay is scaled by it too.
                self.page.record(
                    result, frame.image, inspected.anomaly_map, model.geometry, model.threshold, frame.received
                )
        if self.capture is not None and result.error is None:
            assert result.score is not None  # a result without an error has a score
            # offer() is O(1) and never blocks; the frame is not modified after inference.
            self.capture.offer(
                frame.image,
                camera_id=header.camera_id,
                frame_id=header.frame_id,
                capture_ts=header.capture_ts,
                score=float(result.score),
                decision=result.decision,
                threshold=model.threshold,
                model_id=model.identity.model_id,
                model_version=model.identity.model_version,
            )
        return encode_result(result, payload)

    # ---------------------------------------------------------------------------- publishing

    def _publish(self, camera_id: str, build: Callable[[int], Outgoing]) -> None:
        """Give the camera's next ``seq`` to ``build`` and queue what it returns for the publisher.

        A result that cannot be queued still used up its seq, so consumers see the gap.
        """
        with self._outbox_lock:
            item = build(self._sequences.next(camera_id))
            try:
                self._outbox.put_nowait(item)
            except queue.Full:
                self.metrics.results_lost.inc(reason="outbox_full")

    def _publish_loop(self, sock: zmq.Socket) -> None:
        interval = self.options.heartbeat_s
        next_heartbeat = time.monotonic()
        while True:
            try:
                item = self._outbox.get(timeout=max(0.0, next_heartbeat - time.monotonic()))
            except queue.Empty:
                item = []
            if item is None:  # the stop sentinel: everything before it has been sent
                break
            # A result still being post-processed holds back the ones behind it, so results leave
            # in the order frames were inspected even with several post workers.
            parts = item.result() if isinstance(item, Future) else item
            if parts and not self._send(sock, parts):
                self.metrics.results_lost.inc(reason="send_failed")
            now = time.monotonic()
            if now >= next_heartbeat:
                self._periodic(sock)
                self._send(sock, encode_heartbeat(self._heartbeat()))
                next_heartbeat = max(next_heartbeat + interval, now)
        self._send(sock, encode_heartbeat(self._heartbeat()))
        # LINGER=0 is right while serving (never block on a slow subscriber) but would discard
        # the last results at shutdown; give them a bounded moment to reach the wire.
        sock.close(linger=FLUSH_LINGER_MS)

    def _periodic(self, sock: zmq.Socket) -> None:
        """Once per heartbeat on the publisher thread: log counts, free idle cameras, rebind results."""
        self._error_log.flush()
        for camera in self._queues.expire_idle():
            self.metrics.cameras_expired.inc()
            log_event(logger, logging.INFO, "camera_expired", camera_id=camera, idle_s=self.options.camera_idle_s)
        if self._rebind_results_due.is_set():
            self._rebind_results(sock)

    def _rebind_results(self, sock: zmq.Socket) -> None:
        """Unbind and bind the results endpoint again: unbinding closes every connection accepted
        on it, so each subscriber reconnects and must pass the CURVE handshake with today's keys."""
        endpoint = self.endpoints["results"]  # the resolved address: a "*" port stays the same port
        with contextlib.suppress(zmq.ZMQError):  # already unbound when a previous rebind failed
            sock.unbind(endpoint)
        deadline = time.monotonic() + REBIND_WAIT_S
        while True:
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as err:
                # The listener closes asynchronously; the port is free again within milliseconds.
                if err.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                self._log_failure("results_rebind_failed", err, endpoint=endpoint)  # retried next heartbeat
                return
            self._rebind_results_due.clear()
            log_event(logger, logging.INFO, "results_rebound", endpoint=endpoint, reason="client key revoked")
            return

    def _send(self, sock: zmq.Socket, parts: list[Any]) -> bool:
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.ZMQError as err:
            # PUB drops at the high-water mark instead of raising; anything else is logged.
            self._error_log.log(logging.ERROR, "publish", "publish_failed", error=str(err))
            return False
        return True

    def _heartbeat(self) -> Heartbeat:
        self._heartbeat_seq += 1
        model = self._model
        totals = self._totals()
        return Heartbeat(
            ts=time.time(),
            seq=self._heartbeat_seq,
            state=self._state,
            ready=self.is_ready(),
            model_id=model.identity.model_id if model else None,
            model_version=model.identity.model_version if model else None,
            backend=model.identity.backend if model else None,
            uptime_s=round(time.monotonic() - self._started_at, 3),
            frames=int(totals["frames"]),
            errors=int(totals["errors"]),
            drops=int(totals["drops"]),
            queue_depth=self._queues.total(),
        )

    # ------------------------------------------------------------------------ models, reload

    def _model_or_raise(self) -> ServingModel:
        model = self._model
        if model is None:
            raise RuntimeError("no model loaded")
        return model

    def _set_model(self, model: ServingModel) -> ServingModel | None:
        with self._swap_lock:
            old = self._model
            self._model = model  # one reference assignment: the inference thread sees old or new
            if old is not None and old.backend is not model.backend:
                self._retired.append(old)
        self.metrics.model_info.clear()
        self.metrics.model_info.set(1, **dataclasses.asdict(model.identity))
        self.metrics.threshold.set(model.threshold)
        if old is None or old.bundle is not model.bundle or old.threshold != model.threshold:
            self.ng_rates.set_expected(model.expected_ng_rate)
        return old

    def _close_retired(self) -> None:
        with self._swap_lock:
            retired, self._retired = self._retired, []
        for model in retired:
            model.backend.close()

    def reload(self, bundle_dir: str | Path | None = None) -> dict[str, Any]:
        """Re-read the allowed CURVE keys, then load ``bundle_dir`` (default: the current folder,
        re-reading bundle.json), validate and self-check it, and swap it in. On any failure the old
        model keeps serving, ``ok`` is False and ``model`` describes the model still serving."""
        with self._reload_lock:
            current = self._model_or_raise()
            allowed_keys = self._refresh_keys()  # revocation must not depend on the bundle being good
            try:
                target = self._reload_target(bundle_dir)
                model = load_serving_model(target, self.options)
            except Exception as err:  # noqa: BLE001 - whatever breaks, the old model stays
                self.metrics.reloads.inc(outcome="refused")
                log_event(logger, logging.WARNING, "reload_refused", requested=str(bundle_dir), reason=str(err))
                kept = f"{current.identity.model_id} {current.identity.model_version}"
                return {"ok": False, "error": f"{err} (still serving {kept})", "model": current.describe()}
            self._set_model(model)  # the swap comes last: nothing after it can fail the reload
            self.bundle_dir = target
            self.metrics.reloads.inc(outcome="ok")
            log_event(
                logger,
                logging.INFO,
                "reloaded",
                old_version=current.identity.model_version,
                allowed_client_keys=allowed_keys,
                **model.describe(),
            )
            return {"ok": True, "model": model.describe(), "previous": current.describe()}

    def _refresh_keys(self) -> dict[str, int] | None:
        if self._allow_list is None:
            return None
        refresh = self._allow_list.refresh()
        if refresh.revoked.get(ZAP_DOMAIN):
            # Intake messages are checked one by one, but PUB cannot refuse one subscriber: the
            # publisher rebinds the endpoint, so every subscriber must authenticate again.
            self._rebind_results_due.set()
        if any(refresh.revoked.values()):
            log_event(logger, logging.WARNING, "client_keys_revoked", **refresh.revoked)
        return refresh.allowed

    def _in_reload_roots(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved.is_relative_to(root) for root in self._reload_roots)

    def _reload_target(self, requested: str | Path | None) -> Path:
        """The bundle folder (or versions root) to load; ReloadRefusedError outside the reload locations.

        Checked on the resolved path (symlinks followed) before anything is read there, and the
        refusal is the same whether the path exists or not, so the control socket reveals nothing
        about files outside the reload locations.
        """
        target = self.bundle_dir if requested is None else Path(requested)
        refusal = ReloadRefusedError(
            f"reload refused: {str(requested)!r} is not inside this daemon's reload locations "
            "(the folder it serves, or a --reload-allow folder)"
        )
        if not self._in_reload_roots(target):
            raise refusal
        if not self._in_reload_roots(resolve_bundle_dir(target)):  # a versions root pointing elsewhere
            raise refusal
        return target

    def set_threshold(self, value: float) -> dict[str, Any]:
        """Override the decision threshold until the next reload (not written to the bundle).

        Only values inside the bundle's score range (extra.score_range) are taken: a threshold
        above every possible score would pass every part.
        """
        with self._reload_lock:
            current = self._model_or_raise()
            score_range = current.bundle.score_range
            refusal = None
            if not np.isfinite(value):
                refusal = f"threshold must be a finite number, got {value}"
            elif score_range is None:
                refusal = (
                    "this bundle records no score range (extra.score_range), so overrides cannot be checked "
                    "and are refused; change bundle.json with `llb-edge bundle set-threshold` and reload"
                )
            elif not score_range[0] <= value <= score_range[1]:
                refusal = (
                    f"threshold {value} is outside the bundle's score range {list(score_range)} "
                    f"(bundle threshold {current.bundle.threshold})"
                )
            if refusal is not None:
                return {"ok": False, "error": refusal, "threshold": current.threshold}
            assert score_range is not None  # refused above otherwise
            self._set_model(dataclasses.replace(current, threshold=float(value), threshold_override=True))
        log_event(logger, logging.INFO, "threshold_override", old=current.threshold, new=float(value))
        return {"ok": True, "threshold": float(value), "previous": current.threshold, "range": list(score_range)}

    # ------------------------------------------------------------------------------ control

    def _control_loop(self, sock: zmq.Socket) -> None:
        for frame in _received(lambda: sock.recv(copy=False), self._stop_control, "control_socket_error"):
            try:
                if not self._authorised(frame, CONTROL_ZAP_DOMAIN, "control"):
                    # REP must answer every request; a revoked operator learns nothing else.
                    reply = {"ok": False, "error": "not authorised"}
                else:
                    reply = self._handle_control(parse_control_request(frame.bytes))
            except ValueError as err:  # a malformed request: the message is for the operator
                reply = {"ok": False, "error": str(err)}
            except Exception as err:  # noqa: BLE001 - REP must always answer
                self._log_failure("control_failed", err)
                reply = {"ok": False, "error": f"internal error: {type(err).__name__}"}
            try:
                sock.send(json.dumps(reply, default=str).encode())
            except zmq.ZMQError as err:
                log_event(logger, logging.WARNING, "control_reply_failed", error=str(err))
        sock.close(linger=0)

    def _handle_control(self, request: ControlRequest) -> dict[str, Any]:
        if request.cmd == "status":
            return {"ok": True, **self.status()}
        if request.cmd == "reload":
            return self.reload(request.args.get("path"))
        value = request.args.get("value")
        if value is None:
            model = self._model_or_raise()
            score_range = model.bundle.score_range
            return {
                "ok": True,
                "threshold": model.threshold,
                "override": model.threshold_override,
                "range": None if score_range is None else list(score_range),
            }
        return self.set_threshold(float(value))

    # ------------------------------------------------------------------------- observability

    def is_live(self) -> bool:
        return not self._stopped.is_set() and all(thread.is_alive() for thread in self._threads)

    def is_ready(self) -> bool:
        return self._state == "serving" and self._model is not None

    def _totals(self) -> dict[str, float]:
        return {
            "frames": self.metrics.frames.total(),
            "errors": self.metrics.errors.total(),
            "drops": self.metrics.drops.total(),
        }

    def _collect_gauges(self) -> None:
        self.metrics.queue_depth.clear()  # expired cameras leave the gauge
        for camera, depth in self._queues.depths().items():
            self.metrics.queue_depth.set(depth, camera=camera)
        self.metrics.ready.set(1.0 if self.is_ready() else 0.0)

    def status(self) -> dict[str, Any]:
        model = self._model
        return {
            "state": self._state,
            "ready": self.is_ready(),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "model": model.describe() if model else None,
            "endpoints": self.endpoints,
            "health": self.health_url,
            "queues": self._queues.depths(),
            "queue_capacity": self._queues.capacity,
            "queue_peak_depth": self._queues.peak_depth,
            "errors": {key[0]: value for key, value in self.metrics.errors.items().items()},
            "capture": self.capture.stats() if self.capture is not None else None,
            **self._totals(),
        }


# ------------------------------------------------------------------------------------ entry points


def serve(bundle_dir: str | Path, options: ServeOptions | None = None, *, settings_file: Path | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; SIGHUP reloads the bundle.

    Returns the process exit code (0 after a graceful stop). Must run on the main thread for the
    signal handlers; elsewhere it serves until the process ends. The resolved settings are logged
    first (``serve_settings``, with the ``settings_file`` they were read from, if any).
    """
    options = options or ServeOptions()
    configure_json_logging(options.log_level.upper())
    log_event(logger, logging.INFO, "serve_settings", bundle=str(bundle_dir),
              settings_file=None if settings_file is None else str(settings_file), settings=options.describe())
    daemon = Daemon(bundle_dir, options).start()
    requests = {"stop": False, "reload": False}

    def on_stop(signum: int, _frame: types.FrameType | None) -> None:
        requests["stop"] = True

    def on_reload(signum: int, _frame: types.FrameType | None) -> None:
        requests["reload"] = True

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_reload)
    try:
        # Handlers only set flags: reloading or stopping inside a signal handler could interrupt
        # the main thread anywhere, including while it holds a lock.
        while not requests["stop"]:
            time.sleep(0.1)
            if requests["reload"]:
                requests["reload"] = False
                daemon.reload()
    finally:
        daemon.stop()
    return 0
