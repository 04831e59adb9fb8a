"""Gateway configuration: which cameras exist, which PLC adapters carry their tags, and timings.

The file is TOML (documented example: configs/gateway.example.toml, reference: docs/gateway.md).
Unknown keys are errors, not warnings: a misspelt key in a plant config would otherwise silently
fall back to a default that nobody chose (a PLC address, a word order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llb_edge.config import ConfigError, apply_settings, coerce_setting, read_settings_file, reject_unknown_keys
from llb_edge.protocol import DEFAULT_RESULTS, is_valid_camera_id
from llb_edge.runtime.gateway.tags import (
    ALL_TAGS,
    MODBUS_BLOCK_REGISTERS,
    S7_BLOCK_BYTES,
    S7_DEFAULT_SPACING_BYTES,
    opcua_node_name,
)

DEFAULT_OPCUA_ENDPOINT = "opc.tcp://127.0.0.1:4840/llb-edge/"
DEFAULT_NAMESPACE = "urn:llb-edge:gateway"
# The node ids an opcua-client adapter writes by default: those of the gateway's own server.
DEFAULT_NODE_TEMPLATE = f"ns=2;s={opcua_node_name('{camera}', '{tag}')}"
WORD_ORDERS = ("big", "little")
MODBUS_PORT = 502
# OPC UA message security, as asyncua's SecurityPolicyType names them ("None": no security). The
# deprecated Basic128Rsa15 and Basic256 policies are left out on purpose.
OPCUA_SECURITY_POLICIES = (
    "None",
    "Basic256Sha256_Sign",
    "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_Sign",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes256Sha256RsaPss_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt",
)

class GatewayConfigError(ConfigError):
    """The gateway config (file or flags) is invalid; the message says where."""


@dataclass(frozen=True)
class CameraConfig:
    camera_id: str
    handshake: bool = False  # the PLC triggers inspections and acknowledges results
    trigger_timeout_s: float = 0.0  # handshake: answer NG if no result this long after a trigger; 0: off
    handshake_adapter: str | None = None  # adapter whose Trigger/ResultsAck count; None: the camera's first


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff between attempts to (re)connect an adapter."""

    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        """The waits after each failed attempt: initial_s, then factor times the last, up to max_s."""
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * self.factor)


@dataclass(frozen=True)
class AdapterConfig:
    name: str
    cameras: tuple[str, ...]  # resolved: never empty after load (empty in the file means all)


@dataclass(frozen=True)
class OpcUaServerConfig(AdapterConfig):
    endpoint: str = DEFAULT_OPCUA_ENDPOINT
    namespace: str = DEFAULT_NAMESPACE
    security: tuple[str, ...] = ("None",)  # endpoints offered (OPCUA_SECURITY_POLICIES)
    certificate: Path | None = None  # the gateway's application certificate (DER or PEM); needed with security
    private_key: Path | None = None  # its private key (PEM)
    trusted_clients: Path | None = None  # folder of client certificates allowed to connect; needed with security
    type: str = "opcua-server"

    @property
    def secured(self) -> bool:
        return self.security != ("None",)


@dataclass(frozen=True)
class OpcUaClientConfig(AdapterConfig):
    url: str = "opc.tcp://127.0.0.1:4840"
    node_template: str = DEFAULT_NODE_TEMPLATE  # {camera} and {tag} are filled in
    # camera -> tag -> node id; BBox may be a list of four node ids (x, y, w, h)
    nodes: dict[str, dict[str, str | list[str]]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()  # tags written; empty: CLIENT_DEFAULT_TAGS
    timeout_s: float = 2.0
    security: str = "None"  # one of OPCUA_SECURITY_POLICIES
    certificate: Path | None = None  # the gateway's client certificate (DER or PEM); needed with security
    private_key: Path | None = None  # its private key (PEM)
    server_certificate: Path | None = None  # the PLC's certificate, pinned; None: taken from its endpoint list
    username: str | None = None  # user authentication, with the password from the environment
    password_env: str | None = None  # name of the environment variable holding the password
    type: str = "opcua-client"


@dataclass(frozen=True)
class ModbusConfig(AdapterConfig):
    mode: str = "client"  # client: we write a PLC's holding registers; server: the PLC polls us
    host: str = "127.0.0.1"
    port: int = MODBUS_PORT
    unit_id: int = 1
    word_order: str = "big"  # 32-bit values: "big" = high word first, "little" = low word first
    base: dict[str, int] = field(default_factory=dict)  # camera -> first register of its block
    timeout_s: float = 1.0

    @property
    def type(self) -> str:
        return f"modbus-{self.mode}"

    def base_of(self, camera_id: str) -> int:
        return self.base[camera_id]


@dataclass(frozen=True)
class S7Config(AdapterConfig):
    """A Siemens S7 CPU reached with PUT/GET (python-snap7): one non-optimised data block."""

    host: str = "127.0.0.1"
    port: int = 102
    rack: int = 0
    slot: int = 1  # S7-300: 2; S7-1200/1500: 1 (or 0)
    db: int = 1
    offset: dict[str, int] = field(default_factory=dict)  # camera -> first byte of its block in the DB
    timeout_s: float = 2.0
    type: str = "s7"


@dataclass(frozen=True)
class GatewayConfig:
    cameras: tuple[CameraConfig, ...]
    adapters: tuple[AdapterConfig, ...]
    results: str = DEFAULT_RESULTS
    fail_safe_s: float = 3.0  # no daemon heartbeat or result for this long: Fault=1, OK=0, Ready=0
    heartbeat_s: float = 1.0  # the Heartbeat tag toggles this often while the vision system is healthy
    handshake_poll_s: float = 0.02  # how often Trigger/ResultsAck are read
    write_timeout_s: float = 2.0  # one adapter call; longer counts as a lost connection
    reconnect: ReconnectPolicy = ReconnectPolicy()
    curve_secret: Path | None = None  # this client's .key_secret
    curve_server_public: Path | None = None  # the daemon's .key

    def camera(self, camera_id: str) -> CameraConfig:
        for camera in self.cameras:
            if camera.camera_id == camera_id:
                return camera
        raise KeyError(camera_id)

    def validate(self) -> None:
        problems: list[str] = []
        if not self.cameras:
            problems.append("no cameras")
        if not self.adapters:
            problems.append("no adapters (add an [adapters.NAME] table or a --opcua/--modbus flag)")
        if self.fail_safe_s <= 0 or self.heartbeat_s <= 0 or self.handshake_poll_s <= 0 or self.write_timeout_s <= 0:
            problems.append("fail_safe_s, heartbeat_s, handshake_poll_s and write_timeout_s must be > 0")
        if not 0 < self.reconnect.initial_s <= self.reconnect.max_s:  # NaN fails it too
            problems.append("reconnect: need 0 < reconnect_initial_s <= reconnect_max_s")
        if not self.reconnect.factor >= 1:  # below 1 the delays shrink to a busy reconnect loop
            problems.append(f"reconnect: reconnect_factor must be >= 1, got {self.reconnect.factor}")
        if (self.curve_secret is None) != (self.curve_server_public is None):
            problems.append("CURVE needs both curve_secret and curve_server_public")
        names = [adapter.name for adapter in self.adapters]
        if len(set(names)) != len(names):
            problems.append(f"adapter names repeat: {names}")
        camera_ids = [camera.camera_id for camera in self.cameras]
        if len(set(camera_ids)) != len(camera_ids):
            problems.append(f"camera ids repeat: {camera_ids}")
        for camera in self.cameras:
            if not is_valid_camera_id(camera.camera_id):
                problems.append(f"camera id {camera.camera_id!r} is not a valid protocol camera id")
            if camera.handshake:
                adapter = self.handshake_adapter(camera.camera_id)
                if adapter is None:
                    problems.append(f"camera {camera.camera_id}: handshake needs an adapter that carries it")
            if camera.trigger_timeout_s < 0:
                problems.append(f"camera {camera.camera_id}: trigger_timeout_s must be >= 0")
        for adapter in self.adapters:
            unknown = [camera for camera in adapter.cameras if camera not in camera_ids]
            if unknown:
                problems.append(f"adapter {adapter.name}: unknown cameras {unknown}")
            problems.extend(_adapter_problems(adapter))
        if problems:
            raise GatewayConfigError("invalid gateway config: " + "; ".join(problems))

    def handshake_adapter(self, camera_id: str) -> AdapterConfig | None:
        """The adapter whose Trigger/ResultsAck inputs drive this camera's handshake."""
        wanted = self.camera(camera_id).handshake_adapter
        for adapter in self.adapters:
            if camera_id in adapter.cameras and (wanted is None or adapter.name == wanted):
                return adapter
        return None


def _adapter_problems(adapter: AdapterConfig) -> list[str]:
    problems: list[str] = []
    if isinstance(adapter, ModbusConfig):
        if adapter.word_order not in WORD_ORDERS:
            problems.append(f"adapter {adapter.name}: word_order must be one of {WORD_ORDERS}")
        if not 0 <= adapter.unit_id <= 255 or not 0 < adapter.port < 65536:
            problems.append(f"adapter {adapter.name}: unit_id 0..255 and port 1..65535")
        starts = sorted(adapter.base.get(camera, -1) for camera in adapter.cameras)
        if any(start < 0 or start + MODBUS_BLOCK_REGISTERS > 65536 for start in starts):
            problems.append(f"adapter {adapter.name}: every camera needs a base register 0..{65536 - 32}")
        if any(b - a < MODBUS_BLOCK_REGISTERS for a, b in zip(starts, starts[1:], strict=False)):
            problems.append(f"adapter {adapter.name}: camera blocks overlap ({MODBUS_BLOCK_REGISTERS} registers each)")
    if isinstance(adapter, S7Config):
        starts = sorted(adapter.offset.get(camera, -1) for camera in adapter.cameras)
        if any(start < 0 or start % 2 for start in starts) or adapter.db < 1:
            problems.append(f"adapter {adapter.name}: db >= 1 and an even byte offset >= 0 for every camera")
        if any(b - a < S7_BLOCK_BYTES for a, b in zip(starts, starts[1:], strict=False)):
            problems.append(f"adapter {adapter.name}: camera blocks overlap ({S7_BLOCK_BYTES} bytes each)")
    if isinstance(adapter, OpcUaServerConfig):
        problems += _security_problems(adapter.name, adapter.security, adapter.certificate, adapter.private_key)
        if not adapter.security:
            problems.append(f"adapter {adapter.name}: security must list at least one policy")
        if adapter.secured and (adapter.trusted_clients is None or not adapter.trusted_clients.is_dir()):
            problems.append(
                f"adapter {adapter.name}: security needs trusted_clients, a folder of the client certificates "
                f"allowed to connect (got {adapter.trusted_clients})"
            )
    if isinstance(adapter, OpcUaClientConfig):
        problems += _security_problems(adapter.name, (adapter.security,), adapter.certificate, adapter.private_key)
        if adapter.server_certificate is not None and not adapter.server_certificate.is_file():
            problems.append(f"adapter {adapter.name}: server_certificate {adapter.server_certificate} is not a file")
        if (adapter.username is None) != (adapter.password_env is None):
            problems.append(f"adapter {adapter.name}: username and password_env go together")
        elif adapter.password_env is not None and adapter.password_env not in os.environ:
            problems.append(f"adapter {adapter.name}: environment variable {adapter.password_env} is not set")
        for camera, tags in adapter.nodes.items():
            problems += [f"adapter {adapter.name}: nodes.{camera}.{tag} must be a node id string (BBox: or 4 of them)"
                         for tag, node in tags.items()
                         if not isinstance(node, str) and not (tag == "BBox" and len(node) == 4)]
        bad = [tag for tag in adapter.tags if tag not in ALL_TAGS]
        for tags in adapter.nodes.values():
            bad += [tag for tag in tags if tag not in ALL_TAGS]
        if bad:
            problems.append(f"adapter {adapter.name}: unknown tags {bad} (known: {', '.join(ALL_TAGS)})")
    return problems


def _security_problems(
    name: str, policies: tuple[str, ...], certificate: Path | None, private_key: Path | None
) -> list[str]:
    problems = []
    unknown = [policy for policy in policies if policy not in OPCUA_SECURITY_POLICIES]
    if unknown:
        known = ", ".join(OPCUA_SECURITY_POLICIES)
        problems.append(f"adapter {name}: unknown security policies {unknown} (known: {known})")
    if any(policy != "None" for policy in policies):
        for what, path in (("certificate", certificate), ("private_key", private_key)):
            if path is None or not path.is_file():
                problems.append(
                    f"adapter {name}: security needs {what}, an existing file (got {path}; "
                    "`llb-edge keys opcua-cert` makes one)"
                )
    return problems


# ------------------------------------------------------------------------------------------ parsing
# Each table of the file goes through the one settings loader (llb_edge/config.py) into the
# dataclasses above, which hold the only copy of every default.

ADAPTER_CLASSES: dict[str, type[AdapterConfig]] = {
    "opcua-server": OpcUaServerConfig,
    "opcua-client": OpcUaClientConfig,
    "modbus-client": ModbusConfig,
    "modbus-server": ModbusConfig,
    "s7": S7Config,
}
ADAPTER_TYPES = tuple(ADAPTER_CLASSES)
FILE_SECTIONS = ("gateway", "cameras", "adapters")
RECONNECT_PREFIX = "reconnect_"  # [gateway] reconnect_initial_s = ... sets ReconnectPolicy.initial_s


def _table(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GatewayConfigError(f"{source}: {where} must be a table")
    return dict(value)


def default_layout(cameras: Sequence[str], spacing: int) -> dict[str, int]:
    """Where cameras' blocks start unless configured: one after the other, ``spacing`` apart."""
    return {camera: index * spacing for index, camera in enumerate(cameras)}


def _adapter(name: str, values: Any, camera_ids: tuple[str, ...], source: str) -> AdapterConfig:
    where = f"adapters.{name}"
    table = _table(values, where, source)
    kind = table.pop("type", None)
    if kind not in ADAPTER_CLASSES:
        raise GatewayConfigError(f"{source}: {where}.type must be one of {ADAPTER_TYPES}, got {kind!r}")
    cameras = coerce_setting(table.pop("cameras", ()), tuple[str, ...], f"{where}.cameras", source) or camera_ids
    fixed: dict[str, Any] = {"name": name, "cameras": cameras}
    if kind.startswith("modbus-"):
        # Default blocks one after the other; the file's `base` table moves any of them.
        fixed |= {"mode": kind.removeprefix("modbus-"), "base": default_layout(cameras, MODBUS_BLOCK_REGISTERS)}
    if kind == "s7":
        fixed["offset"] = default_layout(cameras, S7_DEFAULT_SPACING_BYTES)
    adapter = ADAPTER_CLASSES[kind](**fixed)
    return apply_settings(adapter, table, source, prefix=f"{where}.", not_settable=("name", "cameras", "mode", "type"))


def _parse(values: dict[str, Any], source: str) -> GatewayConfig:
    reject_unknown_keys(values, FILE_SECTIONS, source)
    cameras = tuple(
        apply_settings(CameraConfig(camera_id), _table(table, f"cameras.{camera_id}", source), source,
                       prefix=f"cameras.{camera_id}.", not_settable=("camera_id",))
        for camera_id, table in _table(values.get("cameras", {}), "cameras", source).items()
    )
    camera_ids = tuple(camera.camera_id for camera in cameras)
    adapters = tuple(_adapter(name, table, camera_ids, source)
                     for name, table in _table(values.get("adapters", {}), "adapters", source).items())
    gateway = _table(values.get("gateway", {}), "gateway", source)
    reconnect = {key.removeprefix(RECONNECT_PREFIX): gateway.pop(key) for key in list(gateway)
                 if key.startswith(RECONNECT_PREFIX)}
    config = apply_settings(GatewayConfig(cameras, adapters), gateway, source, prefix="gateway.",
                            not_settable=("cameras", "adapters", "reconnect"))
    return dataclasses.replace(config, reconnect=apply_settings(
        config.reconnect, reconnect, source, prefix=f"gateway.{RECONNECT_PREFIX}"))


def parse_config(values: dict[str, Any], where: str = "config") -> GatewayConfig:
    """A GatewayConfig from parsed TOML (validated); ``where`` names the file in errors."""
    try:
        config = _parse(values, where)
    except GatewayConfigError:
        raise
    except ConfigError as err:
        raise GatewayConfigError(str(err)) from err
    config.validate()
    return config


def load_config(path: str | Path) -> GatewayConfig:
    try:
        values = read_settings_file(path)
    except ConfigError as err:
        raise GatewayConfigError(f"cannot read gateway config: {err}") from err
    return parse_config(values, str(path))
