"""Health endpoints and Prometheus metrics for the daemon, with no dependency beyond the stdlib.

- ``GET /live``: 200 while the daemon's threads run (a supervisor restarts the process otherwise).
- ``GET /ready``: 200 while a model is loaded and frames are accepted; 503 while starting or
  stopping (a load balancer or the PLC gateway holds off).
- ``GET /metrics``: Prometheus text exposition format 0.0.4.
- anything else is offered to ``pages`` (the operator page, runtime/operator_page.py), if given.

Connections are bounded: a client that has not finished its request within ``idle_timeout_s``
(2 s) is disconnected, and beyond ``max_connections`` (16) open connections new ones are closed
at once, so half-open connections cannot pile up threads.

The registry is deliberately tiny (counters, gauges, histograms with labels): prometheus_client
would be one more package to vet and install on every line PC for what is a few dozen lines.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

from llb_edge.protocol import DEFAULT_HEALTH_HOST, DEFAULT_HEALTH_PORT

LabelValues = tuple[str, ...]
_M = TypeVar("_M", bound="_Metric")

# Seconds; spans sub-millisecond CPU stages up to a slow first batch.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# A probe's request is a few hundred bytes on a local link: 2 s is ample, and a stalled client
# frees its thread quickly. 16 connections are far more than the probes and scrapers of one daemon.
HEALTH_IDLE_TIMEOUT_S = 2.0
HEALTH_MAX_CONNECTIONS = 16


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def items(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_format_labels(self.label_names, key)} {_format_number(value)}"
            for key, value in sorted(self.items().items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        # per label set: [count per bucket (non-cumulative, last is +Inf)], sum, count
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def _samples(self) -> list[str]:
        lines: list[str] = []
        with self._lock:
            series = {key: (list(counts), total[0]) for key, (counts, total) in self._series.items()}
        for key, (counts, total) in sorted(series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                le = f'le="{_format_number(bound)}"'
                lines.append(f"{self.name}_bucket{_format_labels(self.label_names, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_format_labels(self.label_names, key)} {_format_number(total)}")
            lines.append(f"{self.name}_count{_format_labels(self.label_names, key)} {cumulative}")
        return lines


class MetricsRegistry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))

    def histogram(self, name: str, help_text: str, buckets: Iterable[float], labels: Sequence[str] = ()) -> Histogram:
        return self._add(Histogram(name, help_text, buckets, labels))

    def add_collector(self, collect: Callable[[], None]) -> None:
        """``collect`` runs before each render, to refresh gauges that are cheaper to read than track."""
        self._collectors.append(collect)

    def render(self) -> str:
        for collect in self._collectors:
            collect()
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"

    def _add(self, metric: _M) -> _M:
        if any(existing.name == metric.name for existing in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric


def parse_prometheus_text(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample; for tests and quick checks, not a full parser."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


@dataclass(frozen=True)
class HttpAnswer:
    """A response from a ``pages`` handler of the health server."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


PageHandler = Callable[[str], HttpAnswer | None]  # the request target -> an answer, or None: not found


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; extra connections are closed."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connections is accepted (and judged) quickly

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections closed because every slot was taken

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """/live, /ready and /metrics (and ``pages``, if given) over HTTP on a background thread."""

    def __init__(
        self,
        registry: MetricsRegistry,
        is_live: Callable[[], bool],
        is_ready: Callable[[], bool],
        host: str = DEFAULT_HEALTH_HOST,
        port: int = DEFAULT_HEALTH_PORT,
        pages: PageHandler | None = None,
        *,
        idle_timeout_s: float = HEALTH_IDLE_TIMEOUT_S,
        max_connections: int = HEALTH_MAX_CONNECTIONS,
    ) -> None:
        routes: dict[str, Callable[[], tuple[int, str, str]]] = {
            "/live": lambda: _probe(is_live(), "live"),
            "/ready": lambda: _probe(is_ready(), "ready"),
            "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", registry.render()),
        }

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s  # socket timeout: a stalled request ends the connection

            def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
                route = routes.get(self.path.split("?", 1)[0])
                page = pages(self.path) if pages is not None and route is None else None
                if page is not None:
                    status, content_type, data, headers = page.status, page.content_type, page.body, page.headers
                else:
                    status, content_type, body = route() if route else (404, "text/plain", "not found\n")
                    data, headers = body.encode(), ()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                # Probes hit these endpoints every few seconds: keep them out of the logs.
                return

        self._server = _BoundedHTTPServer((host, port), Handler, max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="llb-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        assert isinstance(host, str)  # bytes only for AF_UNIX sockets; this server is TCP
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _probe(ok: bool, name: str) -> tuple[int, str, str]:
    return (200, "text/plain", f"{name}\n") if ok else (503, "text/plain", f"not {name}\n")
