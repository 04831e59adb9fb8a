"""OPC UA adapters (asyncua): the gateway's own server, and a client writing into a PLC's server.

Server layout (namespace ``urn:llb-edge:gateway`` unless configured)::

    Objects/Inspection/<camera>/<Tag>      NodeId  ns=<idx>;s=Inspection.<camera>.<Tag>

The client adapter writes the same tags into node ids the PLC already has (a template such as
``ns=3;s="DB_Vision"."{camera}"."{tag}"`` plus per-tag overrides). It reads each node's data type
once per connection and writes exactly that type: PLC servers refuse a Double for a REAL, and
Siemens servers refuse writes that carry timestamps, so client writes carry none.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

from asyncua import Client, Node, Server, ua

from llb_edge.runtime.gateway.adapters import (
    TAG_TYPES,
    Adapter,
    HandshakeInputs,
    Tags,
    WriteKind,
    ordered_writes,
)
from llb_edge.runtime.gateway.config import ALL_TAGS, GATEWAY_TAGS, PLC_TAGS, OpcUaClientConfig, OpcUaServerConfig

FOLDER = "Inspection"

# Integer ranges per OPC UA type: a value outside its node's range would fail the whole write.
_INT_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


def server_node_id(namespace_index: int, camera_id: str, tag: str) -> ua.NodeId:
    return ua.NodeId(f"{FOLDER}.{camera_id}.{tag}", namespace_index)


def convert(value: Any, variant_type: ua.VariantType) -> Any:
    """``value`` as the Python value a node of ``variant_type`` takes (lists element-wise)."""
    if isinstance(value, list | tuple):
        return [convert(item, variant_type) for item in value]
    if variant_type == ua.VariantType.Boolean:
        return bool(value)
    if variant_type in (ua.VariantType.Float, ua.VariantType.Double):
        return float(value)
    if variant_type == ua.VariantType.String:
        return str(value)
    if variant_type in _INT_RANGES:
        low, high = _INT_RANGES[variant_type]
        return max(low, min(high, int(value)))
    return value


def _variant(value: Any, variant_type: ua.VariantType) -> ua.Variant:
    return ua.Variant(convert(value, variant_type), variant_type)


class OpcUaServerAdapter(Adapter):
    """An asyncua server hosting one Inspection object per camera; PLCs and HMIs connect to it."""

    def __init__(self, settings: OpcUaServerConfig) -> None:
        self.settings = settings
        self.name = settings.name
        self.cameras = settings.cameras
        self._server: Server | None = None
        self._namespace_index = 2
        self.endpoint = settings.endpoint

    @property
    def namespace_index(self) -> int:
        return self._namespace_index

    async def connect(self) -> None:
        server = Server()
        self._server = server  # from here on close() stops it, whatever fails below
        await server.init()
        server.set_endpoint(self.settings.endpoint)
        server.set_server_name("llb-edge gateway")
        # Plain endpoint only: PLC OPC UA clients are configured per site; security (certificates,
        # users) is not implemented yet and is documented as such in docs/gateway.md.
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(self.settings.namespace)
        folder = await server.nodes.objects.add_folder(ua.NodeId(FOLDER, index), ua.QualifiedName(FOLDER, index))
        for camera_id in self.cameras:
            inspection = await folder.add_object(
                ua.NodeId(f"{FOLDER}.{camera_id}", index), ua.QualifiedName(camera_id, index)
            )
            initial = Tags().by_name() | {"Trigger": 0, "ResultsAck": 0}
            for tag in ALL_TAGS:
                variant_type = ua.VariantType[TAG_TYPES[tag].opcua]
                node = await inspection.add_variable(
                    server_node_id(index, camera_id, tag),
                    ua.QualifiedName(tag, index),
                    _variant(initial[tag], variant_type),
                )
                if tag in PLC_TAGS:
                    await node.set_writable()
        self._namespace_index = index
        await server.start()

    async def _write(self, camera_id: str, items: list[tuple[str, Any]]) -> None:
        if self._server is None:
            raise ConnectionError("OPC UA server not started")
        now = datetime.datetime.now(datetime.UTC)
        for tag, value in items:
            variant = _variant(value, ua.VariantType[TAG_TYPES[tag].opcua])
            await self._server.write_attribute_value(
                server_node_id(self._namespace_index, camera_id, tag),
                ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now),
            )

    async def _write_kind(self, camera_id: str, tags: Tags, kind: WriteKind) -> None:
        data, strobe = ordered_writes(tags, kind)
        await self._write(camera_id, [*data, strobe])  # in this order: the strobe after its data

    async def write_result(self, camera_id: str, tags: Tags) -> None:
        await self._write_kind(camera_id, tags, "result")

    async def write_health(self, camera_id: str, tags: Tags) -> None:
        await self._write_kind(camera_id, tags, "health")

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        if self._server is None:
            raise ConnectionError("OPC UA server not started")
        values = [
            self._server.read_attribute_value(server_node_id(self._namespace_index, camera_id, tag)).Value.Value
            for tag in PLC_TAGS
        ]
        return HandshakeInputs(trigger=int(values[0] or 0), ack=int(values[1] or 0))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):  # a server that never started has nothing to stop
                await server.stop()


class OpcUaClientAdapter(Adapter):
    """Writes the tags into an OPC UA server on the PLC (node ids from the config)."""

    def __init__(self, settings: OpcUaClientConfig) -> None:
        self.settings = settings
        self.name = settings.name
        self.cameras = settings.cameras
        self._client: Client | None = None
        # camera -> tag -> [(node, type)]; BBox may map to four scalar nodes
        self._targets: dict[str, dict[str, list[tuple[Node, ua.VariantType]]]] = {}

    def node_ids(self, camera_id: str, tag: str) -> list[str]:
        override = self.settings.nodes.get(camera_id, {}).get(tag)
        if override is not None:
            return list(override) if isinstance(override, list) else [override]
        return [self.settings.node_template.format(camera=camera_id, tag=tag)]

    @property
    def written_tags(self) -> tuple[str, ...]:
        return self.settings.tags or GATEWAY_TAGS

    async def _resolve(self, client: Client, camera_id: str, tag: str) -> list[tuple[Node, ua.VariantType]]:
        targets = []
        for node_id in self.node_ids(camera_id, tag):
            node = client.get_node(node_id)
            try:
                variant_type = await node.read_data_type_as_variant_type()
            except ua.UaStatusCodeError as err:
                raise LookupError(f"node {node_id} ({camera_id}.{tag}) is not readable on the PLC: {err}") from err
            targets.append((node, variant_type))
        return targets

    async def connect(self) -> None:
        client = Client(self.settings.url, timeout=self.settings.timeout_s)
        await client.connect()
        self._client = client  # set first so that close() releases it if resolving fails
        targets: dict[str, dict[str, list[tuple[Node, ua.VariantType]]]] = {}
        for camera_id in self.cameras:
            targets[camera_id] = {tag: await self._resolve(client, camera_id, tag) for tag in self.written_tags}
        self._targets = targets

    def _data_values(self, camera_id: str, items: list[tuple[str, Any]]) -> tuple[list[ua.NodeId], list[ua.DataValue]]:
        node_ids: list[ua.NodeId] = []
        values: list[ua.DataValue] = []
        for tag, value in items:
            targets = self._targets[camera_id].get(tag)
            if targets is None:
                continue  # not mapped on this PLC (the tags option)
            # One array node takes the list; several scalar nodes take one element each.
            parts = [value] if len(targets) == 1 else list(value)
            for (node, variant_type), part in zip(targets, parts, strict=True):
                node_ids.append(node.nodeid)
                values.append(ua.DataValue(_variant(part, variant_type)))
        return node_ids, values

    async def _write(self, camera_id: str, items: list[tuple[str, Any]]) -> None:
        if self._client is None:
            raise ConnectionError("not connected")
        node_ids, values = self._data_values(camera_id, items)
        if not node_ids:
            return
        results = await self._client.uaclient.write_attributes(node_ids, values, ua.AttributeIds.Value)
        for node_id, status in zip(node_ids, results, strict=True):
            if not status.is_good():
                raise ua.UaStatusCodeError(status.value, f"writing {node_id}")

    async def _write_kind(self, camera_id: str, tags: Tags, kind: WriteKind) -> None:
        data, strobe = ordered_writes(tags, kind)
        # Two requests: a server need not apply one request's items in order, and a PLC that sees
        # ResultValid change must find the data already there.
        await self._write(camera_id, data)
        await self._write(camera_id, [strobe])

    async def write_result(self, camera_id: str, tags: Tags) -> None:
        await self._write_kind(camera_id, tags, "result")

    async def write_health(self, camera_id: str, tags: Tags) -> None:
        await self._write_kind(camera_id, tags, "health")

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        if self._client is None:
            raise ConnectionError("not connected")
        nodes = [self._client.get_node(self.node_ids(camera_id, tag)[0]) for tag in PLC_TAGS]
        trigger, ack = await self._client.read_values(nodes)
        return HandshakeInputs(trigger=int(trigger or 0), ack=int(ack or 0))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # a dead connection cannot close its session cleanly
                await client.disconnect()
