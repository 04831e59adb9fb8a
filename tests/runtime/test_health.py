"""The metrics registry's Prometheus text and the health server's status codes."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from llb_edge.runtime.health import HealthServer, MetricsRegistry, parse_prometheus_text


def test_registry_renders_prometheus_text() -> None:
    registry = MetricsRegistry()
    frames = registry.counter("t_frames_total", "Frames", ["camera"])
    depth = registry.gauge("t_depth", "Depth")
    latency = registry.histogram("t_latency_seconds", "Latency", [0.01, 0.1])
    frames.inc(camera='a"b')
    frames.inc(2, camera="c")
    depth.set(3)
    for value in (0.005, 0.05, 0.5):
        latency.observe(value)
    text = registry.render()
    assert "# TYPE t_frames_total counter" in text and "# TYPE t_latency_seconds histogram" in text
    samples = parse_prometheus_text(text)
    assert samples['t_frames_total{camera="a\\"b"}'] == 1 and samples['t_frames_total{camera="c"}'] == 2
    assert samples["t_depth"] == 3
    assert samples['t_latency_seconds_bucket{le="0.01"}'] == 1
    assert samples['t_latency_seconds_bucket{le="0.1"}'] == 2  # cumulative
    assert samples['t_latency_seconds_bucket{le="+Inf"}'] == 3
    assert samples["t_latency_seconds_count"] == 3
    assert samples["t_latency_seconds_sum"] == pytest.approx(0.555)
    with pytest.raises(ValueError):
        frames.inc(wrong="label")
    with pytest.raises(ValueError):
        registry.counter("t_depth", "again")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_health_server_reports_not_ready_with_503() -> None:
    state = {"live": True, "ready": False}
    server = HealthServer(MetricsRegistry(), lambda: state["live"], lambda: state["ready"], port=0)
    server.start()
    try:
        assert _status(server.url + "/live") == 200
        assert _status(server.url + "/ready") == 503
        state["ready"] = True
        assert _status(server.url + "/ready") == 200
        state["live"] = False
        assert _status(server.url + "/live") == 503
    finally:
        server.stop()
