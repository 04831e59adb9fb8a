"""ZeroMQ CURVE keys: authenticated, encrypted sockets between cameras, daemon and watchers.

Workflow (``llb-edge keys generate``):

1. ``generate_keypair(keys_dir, "server")`` on the line PC: ``server.key`` (public, hand it to
   clients) and ``server.key_secret`` (stays on the line PC).
2. ``generate_keypair(keys_dir, "camera1")`` per client; copy each client's ``*.key`` (public
   part only) into the daemon's allowed-clients folder.
3. The daemon serves with ``curve_secret=server.key_secret`` and ``curve_allowed=<folder>``;
   clients connect with their own ``*.key_secret`` and the server's ``server.key``.

A client whose public key is not in the folder completes no handshake: its frames never reach the
daemon. The folder is re-read on every reload, so adding a camera needs no restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

# Server and client keys belong to one ZAP domain; the name appears in the authenticator's logs.
ZAP_DOMAIN = "llb-edge"


@dataclass(frozen=True)
class KeyPairFiles:
    public: Path  # <name>.key: safe to copy anywhere
    secret: Path  # <name>.key_secret: holds the secret key, readable by its owner only


def require_plain_name(name: str, what: str) -> None:
    """Key and certificate names become file names: refuse paths and hidden files."""
    if not name or any(sep in name for sep in ("/", "\\")) or name.startswith("."):
        raise ValueError(f"{what} must be a plain file name, got {name!r}")


def generate_keypair(directory: str | Path, name: str) -> KeyPairFiles:
    """Write ``<name>.key`` and ``<name>.key_secret`` (ZeroMQ certificate files) into ``directory``."""
    require_plain_name(name, "key name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
    os.chmod(secret, 0o600)
    return KeyPairFiles(public=public, secret=secret)


def _load_secret(path: str | Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def _load_public(path: str | Path) -> bytes:
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def configure_server(socket: zmq.Socket, server_secret_file: str | Path) -> None:
    """Make ``socket`` a CURVE server (call before bind)."""
    public, secret = _load_secret(server_secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.curve_server = True


def configure_client(socket: zmq.Socket, client_secret_file: str | Path, server_public_file: str | Path) -> None:
    """Make ``socket`` a CURVE client of the server whose public key file is given (before connect)."""
    public, secret = _load_secret(client_secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = _load_public(server_public_file)


class ClientAllowList:
    """The ZAP authenticator of a CURVE server: only client keys found in ``allowed_dir`` pass."""

    def __init__(self, context: zmq.Context, allowed_dir: str | Path) -> None:
        self.allowed_dir = Path(allowed_dir)
        if not self.allowed_dir.is_dir():
            raise ValueError(f"allowed client keys folder {self.allowed_dir} does not exist")
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        self.refresh()

    def refresh(self) -> int:
        """Re-read the folder; returns how many client keys are allowed."""
        self._authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(self.allowed_dir))
        return len(list(self.allowed_dir.glob("*.key")))

    def stop(self) -> None:
        self._authenticator.stop()
