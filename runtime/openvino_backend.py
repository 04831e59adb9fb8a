"""The OpenVINO CPU backend: a bundle's model on line PCs without a GPU, in fp32, bf16 or INT8.

Variants (docs/bundle.md, "OpenVINO variants"), each a ``format = "openvino"`` entry of bundle.json:

- **fp32**: the bundle's fp32 ONNX, compiled with the inference precision hint f32. The hint is
  not optional: on CPUs with AVX-512 BF16 or AMX, OpenVINO's default precision is bf16, so a
  model compiled without it silently runs in reduced precision.
- **bf16**: the same ONNX compiled with the hint bf16 (no file of its own).
- **int8**: a post-training quantised model (NNCF, calibrated on the run's kept training images),
  stored as the compiled-model blob OpenVINO exports; the layers left unquantised run in f32.

A reduced-precision variant exists in a bundle only after passing the decision gate on this CPU
(exporters/openvino.py, exporters/parity.py). Its gate figures hold for the CPU and OpenVINO
version it was measured on, so each entry records them in ``target`` and the runtime uses only
entries whose target is this machine: another CPU or OpenVINO version gets the fp32 variant.

This module is torch-free and imports openvino only when a backend is created or the machine is
described, so the line install stays light.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge.bundle import INPUT_NAME, MAP_OUTPUT, MAX_OUTPUT, SCORE_OUTPUT
from llb_edge.runtime.backends import DEFAULT_MAX_BATCH, Backend, BackendError, BackendOutputs, pad_batch

FORMAT = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
# bundle precision -> OpenVINO inference precision hint; INT8 layers are fixed by the quantised
# model, and the layers NNCF leaves unquantised keep f32 so only the quantisation is measured.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BLOB_SUFFIX = ".blob"
# /proc/cpuinfo flags that decide which kernels OpenVINO picks (vector ISA, dot-product and matrix
# extensions). Other flags (mitigations, virtualisation) change nothing about the numbers.
_ISA_FLAG = re.compile(r"^(sse\d.*|ssse3|avx.*|amx.*|fma.*|f16c|vnni.*|.*bf16.*|.*fp16.*|sve.*|asimd.*|neon)$")


def import_openvino() -> Any:
    """``import openvino`` with an error that says how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise BackendError(
            "OpenVINO is not installed here (import openvino failed): pip install 'llb-edge[openvino]'"
        ) from err
    return openvino


def openvino_version() -> str:
    """The OpenVINO release, e.g. "2026.4.1" (the build suffix of ov.get_version() dropped)."""
    return str(import_openvino().__version__).split("-")[0]


@dataclass(frozen=True)
class CpuInfo:
    """What decides a CPU variant's numbers: the CPU model and its instruction-set flags."""

    model: str
    flags: tuple[str, ...]

    def key(self) -> str:
        canonical = json.dumps({"model": self.model, "flags": list(self.flags)}, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.model.lower()).strip("-")[:40] or "cpu"

    def describe(self) -> dict[str, Any]:
        return {"cpu": self.model, "cpu_flags": list(self.flags), "cpu_key": self.key()}


def _cpuinfo_flags(text: str) -> tuple[str, ...]:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86 / ARM
            return tuple(sorted({flag for flag in value.split() if _ISA_FLAG.match(flag)}))
    return ()


def detect_cpu(core: Any | None = None) -> CpuInfo:
    """This machine's CPU as OpenVINO names it, with ISA flags from /proc/cpuinfo where it exists.

    Without /proc/cpuinfo (Windows), OpenVINO's optimisation capabilities stand in for the flags.
    """
    core = core if core is not None else import_openvino().Core()
    model = str(core.get_property("CPU", "FULL_DEVICE_NAME")).strip()
    cpuinfo = Path("/proc/cpuinfo")
    flags = _cpuinfo_flags(cpuinfo.read_text()) if cpuinfo.is_file() else ()
    if not flags:
        flags = tuple(sorted(str(c).lower() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    return CpuInfo(model, flags)


def variant_cache_key(onnx_sha256: str, openvino: str, cpu: CpuInfo, precision: str) -> str:
    """A stable key for a variant: (ONNX sha256, OpenVINO version, CPU model and flags, precision)."""
    identity = {"onnx_sha256": onnx_sha256, "openvino": openvino, "cpu": cpu.model, "cpu_flags": list(cpu.flags),
                "precision": precision}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def target_mismatch(target: dict[str, Any], cpu: CpuInfo, openvino: str) -> str | None:
    """Why a variant built for ``target`` must not run here, or None when it was built for this machine."""
    if target.get("openvino") != openvino:
        return f"built with OpenVINO {target.get('openvino')}, this machine has {openvino}"
    if target.get("cpu_key") != cpu.key():
        return f"built and gated on CPU {target.get('cpu')!r} (key {target.get('cpu_key')}), this is {cpu.model!r}"
    return None


def compile_config(precision: str, threads: int | None) -> dict[str, str]:
    """The CPU plugin properties of a variant: precision hint, one latency-oriented stream, threads."""
    if precision not in INFERENCE_PRECISION:
        raise BackendError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    # LATENCY: one stream using every thread; the daemon runs one batch at a time.
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def compile_variant(model_path: str | Path, precision: str, threads: int | None = None) -> Any:
    """A compiled model: an ONNX graph (fp32, bf16) or an exported INT8 blob, with the variant's hints.

    The hints are passed on import too: an imported blob does not keep the precision it was
    compiled with, and would otherwise run at the CPU's default (bf16 where supported).
    """
    ov = import_openvino()
    core = ov.Core()
    config = compile_config(precision, threads)
    path = Path(model_path)
    try:
        if path.suffix == BLOB_SUFFIX:
            return core.import_model(path.read_bytes(), "CPU", config)
        return core.compile_model(str(path), "CPU", config)
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        raise BackendError(f"OpenVINO cannot load {path} ({precision}): {err}") from err


class OpenVinoBackend(Backend):
    """A bundle variant on the OpenVINO CPU plugin; batches of any size up to ``max_batch``."""

    def __init__(
        self, model_path: str | Path, *, precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
        threads: int | None = None,
    ) -> None:
        self._compiled = compile_variant(model_path, precision, threads)
        inputs = {name for port in self._compiled.inputs for name in port.get_names()}
        outputs = {name for port in self._compiled.outputs for name in port.get_names()}
        missing = [name for name in (MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT) if name not in outputs]
        if INPUT_NAME not in inputs or missing:
            raise BackendError(
                f"{model_path} breaks the graph contract: needs input {INPUT_NAME!r} and outputs "
                f"{MAP_OUTPUT}, {SCORE_OUTPUT}, {MAX_OUTPUT} (missing: {missing or INPUT_NAME})"
            )
        batch_dim = self._compiled.input(INPUT_NAME).get_partial_shape()[0]
        self._fixed_batch = batch_dim.get_length() if batch_dim.is_static else None
        self.max_batch = self._fixed_batch or max(1, max_batch)
        self._request = self._compiled.create_infer_request()
        self.precision = precision
        self.name = f"openvino-{precision}"

    @property
    def inference_precision(self) -> str:
        """What the precision hint became on this CPU ("f32", "bf16"); a CPU without bf16 runs f32."""
        return str(self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string())

    def _run_chunk(self, batch: np.ndarray) -> BackendOutputs:
        count = len(batch)
        results = self._request.infer({INPUT_NAME: pad_batch(batch, self._fixed_batch)})
        by_name = {name: value for port, value in results.items() for name in port.get_names()}
        # The request owns its output buffers and reuses them on the next call: copy out.
        return (
            np.array(by_name[MAP_OUTPUT], dtype=np.float32)[:count],
            np.array(by_name[SCORE_OUTPUT], dtype=np.float32).reshape(-1)[:count],
            np.array(by_name[MAX_OUTPUT], dtype=np.float32).reshape(-1)[:count],
        )

    def close(self) -> None:
        self._request = None
        self._compiled = None
