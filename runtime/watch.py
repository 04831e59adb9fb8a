"""`llb-edge watch`: subscribe to a daemon's results and print one line per result."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import zmq

from llb_edge.protocol import (
    DEFAULT_RESULTS,
    Heartbeat,
    ProtocolError,
    ResultHeader,
    decode_published,
    subscription_topics,
)
from llb_edge.runtime.keys import configure_client


def format_result(result: ResultHeader) -> str:
    """One line: camera, frame, decision, score, region, latency, model."""
    head = f"{result.camera_id} #{result.frame_id}"
    if result.error is not None:
        return f"{head} ERROR {result.error.code.name}: {result.error.message}"
    region = "-"
    if result.region is not None:
        x, y, w, h = result.region.bbox
        region = f"area={result.region.area_px}px bbox=({x},{y},{w},{h})"
    total = result.latency_ms.get("total")
    latency = f"{total:.1f}ms" if total is not None else "-"
    return (
        f"{head} {result.decision} score={result.score:.4f} thr={result.threshold:.4f} {region} "
        f"latency={latency} model={result.model_id}@{result.model_version}/{result.backend}"
    )


def format_heartbeat(heartbeat: Heartbeat) -> str:
    return (
        f"heartbeat #{heartbeat.seq} {heartbeat.state} ready={heartbeat.ready} frames={heartbeat.frames} "
        f"errors={heartbeat.errors} drops={heartbeat.drops} queue={heartbeat.queue_depth}"
    )


def watch(
    endpoint: str = DEFAULT_RESULTS,
    *,
    cameras: list[str] | None = None,
    count: int | None = None,
    timeout_s: float | None = None,
    heartbeats: bool = False,
    out: TextIO | None = None,
    curve_secret: str | Path | None = None,
    curve_server_public: str | Path | None = None,
    connected: threading.Event | None = None,
    context: zmq.Context | None = None,
) -> list[ResultHeader]:
    """Print results from ``endpoint`` until ``count`` results, ``timeout_s`` seconds, or Ctrl-C.

    ``cameras`` limits output to those camera ids (exact match). Heartbeats are always received
    (they prove the subscription is live: ``connected`` is set on the first message of any kind)
    but printed only with ``heartbeats=True``. Returns the results seen.
    """
    out = out or sys.stdout
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.rcvtimeo = 100
    if curve_secret is not None and curve_server_public is not None:
        configure_client(sock, curve_secret, curve_server_public)
    for topic in subscription_topics(cameras or ()):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    wanted = set(cameras) if cameras else None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    results: list[ResultHeader] = []
    try:
        while (count is None or len(results) < count) and (deadline is None or time.monotonic() < deadline):
            try:
                parts = sock.recv_multipart()
            except zmq.Again:
                continue
            if connected is not None:
                connected.set()
            try:
                message = decode_published(parts)
            except ProtocolError as err:
                print(f"unreadable message: {err}", file=out, flush=True)
                continue
            if isinstance(message, Heartbeat):
                if heartbeats:
                    print(format_heartbeat(message), file=out, flush=True)
                continue
            result, _ = message
            if wanted is not None and result.camera_id not in wanted:
                continue  # prefix subscriptions also deliver cam10 to a cam1 watcher
            results.append(result)
            print(format_result(result), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return results
