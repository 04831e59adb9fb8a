"""What `llb-edge serve` can be told (ServeOptions), its defaults, and its settings file.

The defaults are the ones declared in ServeOptions, and nowhere else: `llb-edge serve` flags show
them and override them only when given. A settings file (serve.toml; example and reference:
configs/serve.example.toml) holds the same keys as the flags, loaded by the one settings loader
(llb_edge/config.py): unknown keys and wrong types are errors naming the key and the file.
Layers, later wins: ServeOptions' defaults, the file, the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llb_edge.config import (
    COMMAND_LINE,
    ConfigError,
    apply_settings,
    coerce_setting,
    plain_settings,
    read_settings_file,
    setting_parser,
)
from llb_edge.protocol import (
    DEFAULT_CONTROL,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HEALTH_PORT,
    DEFAULT_INTAKE,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_RESULTS,
    MAP_ENCODINGS,
    is_local_endpoint,
)
from llb_edge.runtime.backends import BACKEND_CHOICES
from llb_edge.runtime.capture import CaptureOptions
from llb_edge.runtime.drift import DEFAULT_NG_RATE_ALPHA, DEFAULT_NG_RATE_WINDOW
from llb_edge.runtime.frames import DEFAULT_CAMERA_IDLE_S, DEFAULT_MAX_PIXELS
from llb_edge.runtime.logs import DEFAULT_LOG_LEVEL
from llb_edge.runtime.roi import RegionOfInterest, RegionOfInterestError, read_mask, region_of_interest

INTAKE_MODES = ("pull", "sub")
MAP_PAYLOAD_CHOICES = ("none", *MAP_ENCODINGS)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class RegionSettings:
    """A camera's region of interest in a settings file: ``[regions.CAMERA]`` with a rectangle, a mask
    image the size of the camera's frames, or both (as --roi and --roi-mask)."""

    box: tuple[int, int, int, int] | None = None  # x, y, width, height in frame pixels
    mask: Path | None = None  # non-zero = inspected


def regions_from_file(value: Any, key: str, source: str) -> dict[str, RegionOfInterest]:
    """``[regions.CAMERA]`` tables as the daemon's regions of interest (the masks are read now)."""
    settings = coerce_setting(value, dict[str, RegionSettings], key, source)
    regions = {}
    for camera, region in settings.items():
        try:
            regions[camera] = region_of_interest(region.box, None if region.mask is None else read_mask(region.mask))
        except RegionOfInterestError as err:
            raise ConfigError(f"{source}: {key}.{camera}: {err}") from err
    return regions


@dataclass
class ServeOptions:
    """Everything `llb-edge serve` can be told; defaults are safe for a line PC (loopback only)."""

    intake: str = DEFAULT_INTAKE  # endpoint frames arrive on
    intake_mode: str = "pull"  # pull (cameras PUSH to us) | sub (we subscribe to cameras' PUB)
    intake_connect: bool = False  # connect to ``intake`` instead of binding it (SUB to a camera)
    results: str = DEFAULT_RESULTS  # PUB endpoint results and heartbeats go out on (bound)
    control: str | None = DEFAULT_CONTROL  # REP endpoint for reload/status/threshold; None: off
    health_host: str = DEFAULT_HEALTH_HOST
    health_port: int | None = DEFAULT_HEALTH_PORT  # HTTP /live /ready /metrics; 0: any free; None: off
    backend: str = "auto"  # auto | tensorrt | ort-cuda | ort-cpu
    max_batch: int = 8
    max_wait_ms: float = 2.0  # how long the oldest frame may wait for a batch to fill
    queue_size: int = 8  # frames per camera before keep-newest drops; >= max_batch: one camera fills a batch
    post_workers: int = 2  # threads post-processing inspected frames while the next batch runs
    max_cameras: int = 64
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded image size limit
    map_payload: str = "none"  # none | uint8 | float16: attach the anomaly map to results
    heartbeat_s: float = 1.0
    intake_hwm: int = 16  # small: a backlog in ZeroMQ buffers is latency the line pays for
    results_hwm: int = 1000
    curve_secret: Path | None = None  # server .key_secret: enables CURVE on intake and results
    curve_allowed: Path | None = None  # folder of allowed client .key files (required with CURVE)
    control_allowed: Path | None = None  # folder of operator .key files for the control socket (CURVE)
    reload_allow: tuple[Path, ...] | None = None  # more folders reloads may load bundles from than the served one
    camera_idle_s: float = DEFAULT_CAMERA_IDLE_S  # a camera silent this long gives up its slot
    ort_threads: int | None = None  # ONNX Runtime intra-op threads; None: all cores
    capture: CaptureOptions = field(default_factory=CaptureOptions)  # frame capture for retraining; off by default
    # Per camera: only this part of its frames is inspected (runtime/roi.py); cameras not listed: the whole frame.
    regions: dict[str, RegionOfInterest] = field(default_factory=dict, metadata=setting_parser(regions_from_file))
    ng_rate_window: int = DEFAULT_NG_RATE_WINDOW  # frames per camera in the NG-rate drift check (runtime/drift.py)
    ng_rate_alpha: float = DEFAULT_NG_RATE_ALPHA  # false-alarm probability of that check per full window
    log_level: str = DEFAULT_LOG_LEVEL  # DEBUG | INFO | WARNING: the JSON log lines on stderr

    def validate(self) -> None:
        problems = []
        if self.intake_mode not in INTAKE_MODES:
            problems.append(f"intake_mode must be one of {INTAKE_MODES}")
        if self.backend not in BACKEND_CHOICES:
            problems.append(f"backend must be one of {BACKEND_CHOICES}")
        if self.map_payload not in MAP_PAYLOAD_CHOICES:
            problems.append(f"map_payload must be one of {MAP_PAYLOAD_CHOICES}")
        positive = (
            "max_batch",
            "queue_size",
            "post_workers",
            "max_cameras",
            "max_payload_bytes",
            "max_pixels",
            "intake_hwm",
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_wait_ms < 0 or self.heartbeat_s <= 0 or self.camera_idle_s <= 0:
            problems.append("max_wait_ms must be >= 0, heartbeat_s and camera_idle_s > 0")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {LOG_LEVELS}")
        if self.ng_rate_window < 1 or not 0.0 < self.ng_rate_alpha < 1.0:
            problems.append("ng_rate_window must be >= 1 and ng_rate_alpha in (0, 1)")
        if (self.curve_secret is None) != (self.curve_allowed is None):
            problems.append("CURVE needs both curve_secret (server key) and curve_allowed (client keys folder)")
        curve = self.curve_secret is not None
        if self.control is not None and curve and self.control_allowed is None:
            problems.append(
                "with CURVE the control socket authenticates operators: give control_allowed (a folder of "
                "operator .key files; it may be curve_allowed) or turn control off"
            )
        if self.control_allowed is not None and not curve:
            problems.append("control_allowed needs CURVE (curve_secret and curve_allowed)")
        if self.control is not None and not curve and not is_local_endpoint(self.control):
            problems.append(
                f"the control endpoint {self.control} is reachable from other machines: bind it to loopback "
                "(tcp://127.0.0.1:PORT) or ipc://, or configure CURVE so that it authenticates operators"
            )
        problems += self.capture.problems()
        if problems:
            raise ValueError("invalid serve options: " + "; ".join(problems))

    def describe(self) -> dict[str, Any]:
        """The settings as JSON values (logged when the daemon starts)."""
        settings = plain_settings(dataclasses.replace(self, regions={}))
        return settings | {"regions": {camera: region.describe() for camera, region in self.regions.items()}}


def load_serve_options(path: str | Path | None, flags: Mapping[str, Any]) -> ServeOptions:
    """ServeOptions' defaults, then the settings file at ``path`` (if any), then ``flags`` (nested like
    the file; the command line's values, as text or typed); validated."""
    options = ServeOptions()
    if path is not None:
        options = apply_settings(options, read_settings_file(path), str(path))
    options = apply_settings(options, flags, COMMAND_LINE, text=True)
    options.validate()
    return options

