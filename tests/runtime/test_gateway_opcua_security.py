"""OPC UA security of both gateway adapters: real asyncua servers and clients, real certificates
made by `llb-edge keys opcua-cert`, signed-and-encrypted channels on loopback."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, Server, ua
from asyncua.crypto import security_policies
from asyncua.crypto.permission_rules import User, UserRole
from test_gateway_e2e import free_port
from typer.testing import CliRunner

from llb_edge.cli import app
from llb_edge.runtime.gateway.adapters import Tags
from llb_edge.runtime.gateway.config import GatewayConfigError, OpcUaClientConfig, OpcUaServerConfig, parse_config
from llb_edge.runtime.gateway.opcua import OpcUaClientAdapter, OpcUaServerAdapter, server_node_id

pytestmark = pytest.mark.timeout(120)

POLICY = "Basic256Sha256_SignAndEncrypt"
PLC_USER, PLC_PASSWORD = "line-3", "not-in-any-file"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    runner = CliRunner()
    for name, role in (("gateway", "server"), ("hmi", "client"), ("intruder", "client"), ("plc", "server"),
                       ("gateway-client", "client")):
        result = runner.invoke(app, ["keys", "opcua-cert", "--name", name, "--uri", f"urn:test:{name}",
                                     "--role", role, "--dir", str(folder)])
        assert result.exit_code == 0, result.output
    (folder / "trusted").mkdir()
    shutil.copy(folder / "hmi.der", folder / "trusted")
    return folder


async def connect_client(url: str, certs: Path, name: str, server_name: str) -> Client:
    client = Client(url, timeout=4)
    client.application_uri = f"urn:test:{name}"
    await client.set_security(
        security_policies.SecurityPolicyBasic256Sha256, str(certs / f"{name}.der"), str(certs / f"{name}.pem"),
        server_certificate=str(certs / f"{server_name}.der"), mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    await client.connect()
    return client


def test_cert_command_refuses_to_overwrite_and_bad_roles(certs: Path) -> None:
    runner = CliRunner()
    again = runner.invoke(app, ["keys", "opcua-cert", "--name", "gateway", "--uri", "urn:x", "--dir", str(certs)])
    assert again.exit_code == 2 and "already exists" in again.output
    role = runner.invoke(app, ["keys", "opcua-cert", "--name", "x", "--uri", "urn:x", "--role", "plc",
                               "--dir", str(certs)])
    assert role.exit_code == 2 and "role must be one of" in role.output
    assert (certs / "gateway.pem").stat().st_mode & 0o077 == 0  # the private key is the owner's alone


def test_secured_gateway_server_serves_trusted_clients_only(certs: Path) -> None:
    url = f"opc.tcp://127.0.0.1:{free_port()}/llb-edge/"
    settings = OpcUaServerConfig(
        name="opcua", cameras=("cam-a",), endpoint=url, security=(POLICY,),
        certificate=certs / "gateway.der", private_key=certs / "gateway.pem", trusted_clients=certs / "trusted",
    )

    async def scenario() -> dict[str, Any]:
        adapter = OpcUaServerAdapter(settings)
        await adapter.connect()
        outcome: dict[str, Any] = {}
        try:
            await adapter.write("cam-a", Tags(result_valid=True, ng=True, score=0.75, inspection_id=42), "result")
            client = await connect_client(url, certs, "hmi", "gateway")
            try:
                node = client.get_node(server_node_id(adapter.namespace_index, "cam-a", "Score"))
                outcome["score"] = await node.read_value()
                ids = client.get_node(server_node_id(adapter.namespace_index, "cam-a", "InspectionID"))
                outcome["inspection_id"] = await ids.read_value()
                outcome["policies"] = {e.SecurityPolicyUri for e in await client.get_endpoints()}
            finally:
                await client.disconnect()
            for name, attempt in (
                ("plain", Client(url, timeout=4).connect()),
                ("intruder", connect_client(url, certs, "intruder", "gateway")),
            ):
                try:
                    intruder = await attempt
                except Exception as err:  # noqa: BLE001 - any refusal will do; what matters is no session
                    outcome[name] = type(err).__name__
                else:
                    await intruder.disconnect()
                    outcome[name] = "connected"
        finally:
            await adapter.close()
        return outcome

    outcome = asyncio.run(scenario())
    assert outcome["score"] == pytest.approx(0.75) and outcome["inspection_id"] == 42
    assert outcome["policies"] == {security_policies.SecurityPolicyBasic256Sha256.URI}  # no plain endpoint
    assert outcome["plain"] != "connected"
    assert outcome["intruder"] != "connected"


class PlcUsers:
    """The PLC's user database: one operator account."""

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username == PLC_USER and password == PLC_PASSWORD:
            return User(role=UserRole.User)
        return None


async def start_secured_plc(url: str, certs: Path) -> tuple[Server, dict[str, ua.NodeId]]:
    server = Server(user_manager=PlcUsers())
    await server.init()
    server.set_endpoint(url)
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    server.set_identity_tokens([ua.UserNameIdentityToken])
    await server.load_certificate(str(certs / "plc.der"))
    await server.load_private_key(str(certs / "plc.pem"))
    await server.set_application_uri("urn:test:plc")
    index = await server.register_namespace("urn:test:plc-tags")
    folder = await server.nodes.objects.add_object(ua.NodeId("PLC.cam-a", index), ua.QualifiedName("cam-a", index))
    nodes = {}
    for tag, variant in (("Score", ua.Variant(0.0, ua.VariantType.Float)),
                         ("ResultValid", ua.Variant(False, ua.VariantType.Boolean))):
        node = await folder.add_variable(ua.NodeId(f"PLC.cam-a.{tag}", index), ua.QualifiedName(tag, index), variant)
        await node.set_writable()
        nodes[tag] = node.nodeid
    await server.start()
    return server, nodes


def test_client_adapter_writes_into_a_secured_plc_with_a_user_login(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLC_PASSWORD", PLC_PASSWORD)
    monkeypatch.setenv("WRONG_PASSWORD", "guess")
    url = f"opc.tcp://127.0.0.1:{free_port()}/plc/"

    def settings(password_env: str) -> OpcUaClientConfig:
        return OpcUaClientConfig(
            name="plc", cameras=("cam-a",), url=url, node_template="ns=2;s=PLC.{camera}.{tag}",
            tags=("Score", "ResultValid"), timeout_s=4.0, security=POLICY,
            certificate=certs / "gateway-client.der", private_key=certs / "gateway-client.pem",
            server_certificate=certs / "plc.der", username=PLC_USER, password_env=password_env,
        )

    async def scenario() -> dict[str, Any]:
        server, nodes = await start_secured_plc(url, certs)
        outcome: dict[str, Any] = {}
        try:
            adapter = OpcUaClientAdapter(settings("PLC_PASSWORD"))
            await adapter.connect()
            try:
                await adapter.write("cam-a", Tags(result_valid=True, ok=True, score=0.25), "result")
            finally:
                await adapter.close()
            outcome["written"] = {tag: server.read_attribute_value(node).Value.Value for tag, node in nodes.items()}
            wrong = OpcUaClientAdapter(settings("WRONG_PASSWORD"))
            try:
                await wrong.connect()
                outcome["wrong_password"] = "connected"
            except Exception as err:  # noqa: BLE001
                outcome["wrong_password"] = type(err).__name__
            finally:
                await wrong.close()
        finally:
            await server.stop()
        return outcome

    outcome = asyncio.run(scenario())
    assert outcome["written"]["Score"] == pytest.approx(0.25) and outcome["written"]["ResultValid"] is True
    assert outcome["wrong_password"] != "connected"


def _config(adapter: dict[str, Any]) -> dict[str, Any]:
    return {"cameras": {"cam-a": {}}, "adapters": {"ua": adapter}}


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"type": "opcua-server", "security": ["Basic256Sha256_SignAndEncrypt"]}, "security needs certificate"),
        ({"type": "opcua-server", "security": ["Basic256_Sign"]}, "unknown security policies"),
        ({"type": "opcua-client", "security": "Aes256Sha256RsaPss_Sign"}, "security needs private_key"),
        ({"type": "opcua-client", "username": "op"}, "username and password_env go together"),
        ({"type": "opcua-client", "username": "op", "password_env": "LLB_EDGE_NO_SUCH_VARIABLE"}, "is not set"),
    ],
)
def test_insecure_or_incomplete_security_settings_are_refused(adapter: dict[str, Any], message: str) -> None:
    with pytest.raises(GatewayConfigError, match=message):
        parse_config(_config(adapter))


def test_server_security_without_trusted_clients_is_refused(certs: Path) -> None:
    adapter = {"type": "opcua-server", "security": [POLICY], "certificate": str(certs / "gateway.der"),
               "private_key": str(certs / "gateway.pem")}
    with pytest.raises(GatewayConfigError, match="security needs trusted_clients"):
        parse_config(_config(adapter))
    config = parse_config(_config({**adapter, "trusted_clients": str(certs / "trusted")}))
    (server,) = config.adapters
    assert isinstance(server, OpcUaServerConfig) and server.secured
