"""OPC UA adapters (asyncua): the gateway's own server, and a client writing into a PLC's server.

Server layout (namespace ``urn:llb-edge:gateway`` unless configured)::

    Objects/Inspection/<camera>/<Tag>      NodeId  ns=<idx>;s=Inspection.<camera>.<Tag>

The client adapter writes the same tags into node ids the PLC already has (a template such as
``ns=3;s="DB_Vision"."{camera}"."{tag}"`` plus per-tag overrides). It reads each node's data type
once per connection and writes exactly that type: PLC servers refuse a Double for a REAL, and
Siemens servers refuse writes that carry timestamps, so client writes carry none.

Security (docs/gateway.md): both adapters speak the signed or signed-and-encrypted policies of
OPC UA with X.509 application certificates (``llb-edge keys opcua-cert`` makes self-signed ones).
The server accepts only clients whose certificate is in its ``trusted_clients`` folder; the client
pins the PLC's certificate when ``server_certificate`` is given and can log in with a user name.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from pathlib import Path
from typing import Any

from asyncua import Client, Node, Server, ua
from asyncua.crypto import cert_gen, security_policies, uacrypto
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.ua.status_codes import get_name_and_doc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from llb_edge.runtime.gateway.adapters import Adapter, HandshakeInputs, PlcWriteKind, Tags, ordered_writes
from llb_edge.runtime.gateway.config import OpcUaClientConfig, OpcUaServerConfig
from llb_edge.runtime.gateway.tags import (
    ALL_TAGS,
    CLIENT_DEFAULT_TAGS,
    OPCUA_FOLDER,
    PLC_TAGS,
    TAG_BY_NAME,
    opcua_node_name,
)
from llb_edge.runtime.keys import require_plain_name

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


def string_node_id(name: str, namespace_index: int) -> ua.NodeId:
    # asyncua's annotations ask for its own str and int subclasses, which is what it makes of these.
    return ua.NodeId(ua.String(name), ua.Int16(namespace_index))


def server_node_id(namespace_index: int, camera_id: str, tag: str) -> ua.NodeId:
    return string_node_id(opcua_node_name(camera_id, tag), namespace_index)


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


# ------------------------------------------------------------------------------------- security

CERT_ROLES = ("server", "client")


def generate_certificate(directory: str | Path, name: str, application_uri: str, role: str) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate: ``<name>.der`` and its key ``<name>.pem``.

    ``role`` is the side the certificate authenticates (server or client; the extended key usage
    OPC UA peers check). Valid for 365 days. Returns (certificate, private key).
    """
    if role not in CERT_ROLES:
        raise ValueError(f"role must be one of {CERT_ROLES}, got {role!r}")
    require_plain_name(name, "certificate name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    certificate, key = directory / f"{name}.der", directory / f"{name}.pem"
    if certificate.exists() or key.exists():
        raise FileExistsError(f"{certificate} or {key} already exists; remove it or choose another name")
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    private_key = cert_gen.generate_private_key()
    names = [x509.UniformResourceIdentifier(application_uri), x509.DNSName(socket.gethostname())]
    cert = cert_gen.generate_self_signed_app_certificate(
        private_key, application_uri, {"commonName": name, "organizationName": "llb-edge"}, names,
        extended=[usage], days=365,
    )
    key.write_bytes(cert_gen.dump_private_key_as_pem(private_key))
    os.chmod(key, 0o600)
    certificate.write_bytes(cert.public_bytes(Encoding.DER))
    return certificate, key


async def application_uri_of(certificate: Path) -> str:
    """The application URI a certificate was issued for (its subjectAltName URI): peers check it."""
    cert = await uacrypto.load_certificate(certificate)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise ValueError(f"{certificate} has no subjectAltName with an application URI") from err
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise ValueError(f"{certificate} has no application URI in its subjectAltName")
    return uris[0]


async def _secure_server(server: Server, settings: OpcUaServerConfig) -> None:
    server.set_security_policy([
        ua.SecurityPolicyType.NoSecurity if policy == "None" else ua.SecurityPolicyType[policy]
        for policy in settings.security
    ])
    if not settings.secured:
        return
    assert settings.certificate and settings.private_key and settings.trusted_clients  # validated with the config
    await server.load_certificate(str(settings.certificate))
    await server.load_private_key(str(settings.private_key))
    await server.set_application_uri(await application_uri_of(settings.certificate))
    trust = TrustStore([settings.trusted_clients], [])
    await trust.load()
    options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
    server.set_certificate_validator(CertificateValidator(options, trust))


async def _secure_client(client: Client, settings: OpcUaClientConfig) -> None:
    if settings.username is not None and settings.password_env is not None:
        client.set_user(settings.username)
        client.set_password(os.environ[settings.password_env])
    if settings.security == "None":
        return
    assert settings.certificate and settings.private_key  # validated with the config
    policy_name, mode = settings.security.split("_")
    client.application_uri = await application_uri_of(settings.certificate)
    await client.set_security(
        getattr(security_policies, f"SecurityPolicy{policy_name}"),
        str(settings.certificate),
        str(settings.private_key),
        server_certificate=None if settings.server_certificate is None else str(settings.server_certificate),
        mode=ua.MessageSecurityMode[mode],
    )


class OpcUaServerAdapter(Adapter[OpcUaServerConfig]):
    """An asyncua server hosting one Inspection object per camera; PLCs and HMIs connect to it."""

    tags_writable_by_others = False  # clients may write Trigger and ResultsAck only

    def __init__(self, settings: OpcUaServerConfig) -> None:
        super().__init__(settings)
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
        await _secure_server(server, self.settings)
        index = await server.register_namespace(self.settings.namespace)
        folder = await server.nodes.objects.add_folder(
            string_node_id(OPCUA_FOLDER, index), ua.QualifiedName(OPCUA_FOLDER, index)
        )
        for camera_id in self.cameras:
            inspection = await folder.add_object(
                string_node_id(f"{OPCUA_FOLDER}.{camera_id}", index), ua.QualifiedName(camera_id, index)
            )
            initial = Tags().by_name() | {"Trigger": 0, "ResultsAck": 0}
            for tag in ALL_TAGS:
                kind = TAG_BY_NAME[tag].type
                variant_type = ua.VariantType[kind.opcua]
                node = await inspection.add_variable(
                    server_node_id(index, camera_id, tag),
                    ua.QualifiedName(tag, index),
                    _variant(initial[tag], variant_type),
                )
                if kind.elements:
                    # A fixed-length one-dimensional array (UInt16[4]); asyncua would leave the
                    # rank open (ValueRank 0, "one or more dimensions").
                    await node.write_value_rank(ua.ValueRank.OneDimension)
                    # ArrayDimensions is an array (UInt32[]); asyncua annotates the value as a plain int.
                    await node.write_array_dimensions([kind.elements])  # type: ignore[arg-type]
                if tag in PLC_TAGS:
                    await node.set_writable()
        self._namespace_index = index
        await server.start()

    async def _write(self, camera_id: str, items: list[tuple[str, Any]]) -> None:
        if self._server is None:
            raise ConnectionError("OPC UA server not started")
        now = ua.DateTime.now(datetime.UTC)
        for tag, value in items:
            variant = _variant(value, ua.VariantType[TAG_BY_NAME[tag].type.opcua])
            await self._server.write_attribute_value(
                server_node_id(self._namespace_index, camera_id, tag),
                ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now),
            )

    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        data, strobe = ordered_writes(tags, kind)
        await self._write(camera_id, [*data, strobe])  # in this order: the strobe after its data

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        if self._server is None:
            raise ConnectionError("OPC UA server not started")
        variants = [self._server.read_attribute_value(server_node_id(self._namespace_index, camera_id, tag)).Value
                    for tag in PLC_TAGS]
        trigger, ack = (0 if variant is None else int(variant.Value or 0) for variant in variants)
        return HandshakeInputs(trigger=trigger, ack=ack)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):  # a server that never started has nothing to stop
                await server.stop()


class OpcUaClientAdapter(Adapter[OpcUaClientConfig]):
    """Writes the tags into an OPC UA server on the PLC (node ids from the config)."""

    def __init__(self, settings: OpcUaClientConfig) -> None:
        super().__init__(settings)
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
        return self.settings.tags or CLIENT_DEFAULT_TAGS

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
        await _secure_client(client, self.settings)
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
                name, doc = get_name_and_doc(status.value)
                raise ConnectionError(f"the OPC UA server refused writing {node_id.to_string()}: {name} ({doc})")

    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        data, strobe = ordered_writes(tags, kind)
        # Two requests: a server need not apply one request's items in order, and a PLC that sees
        # ResultValid change must find the data already there.
        await self._write(camera_id, data)
        await self._write(camera_id, [strobe])

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
