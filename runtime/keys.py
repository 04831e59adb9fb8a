"""ZeroMQ CURVE keys: authenticated, encrypted sockets between cameras, daemon and watchers.

Workflow (``llb-edge keys generate``):

1. ``generate_keypair(keys_dir, "server")`` on the line PC: ``server.key`` (public, hand it to
   clients) and ``server.key_secret`` (stays on the line PC).
2. ``generate_keypair(keys_dir, "camera1")`` per client; copy each client's ``*.key`` (public
   part only) into the daemon's allowed-clients folder.
3. The daemon serves with ``curve_secret=server.key_secret`` and ``curve_allowed=<folder>``;
   clients connect with their own ``*.key_secret`` and the server's ``server.key``.

A client whose public key is not in the folder completes no handshake: its frames never reach the
daemon. The folders are re-read on every reload, so adding a camera needs no restart, and a key
removed from a folder is refused from its next message on, even on a connection that is already
open (every message carries the key it was authenticated with, its ZeroMQ ``User-Id``).

The control socket has its own ZAP domain and folder (operator keys), so a camera's key cannot
change thresholds or load bundles.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

# ZAP domains: the name tells the authenticator which folder of allowed keys applies.
ZAP_DOMAIN = "llb-edge"  # intake and results: cameras and result subscribers
CONTROL_ZAP_DOMAIN = "llb-edge-control"  # the control socket: operators


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


def configure_server(socket: zmq.Socket, server_secret_file: str | Path, domain: str = ZAP_DOMAIN) -> None:
    """Make ``socket`` a CURVE server whose clients are checked in ``domain`` (call before bind)."""
    public, secret = _load_secret(server_secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.zap_domain = domain.encode()
    socket.curve_server = True


def configure_client(socket: zmq.Socket, client_secret_file: str | Path, server_public_file: str | Path) -> None:
    """Make ``socket`` a CURVE client of the server whose public key file is given (before connect)."""
    public, secret = _load_secret(client_secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = _load_public(server_public_file)


def load_public_keys(folder: str | Path) -> frozenset[str]:
    """The z85 public keys of every ``*.key`` certificate in ``folder``."""
    return frozenset(key.decode("ascii") for key in zmq.auth.load_certificates(str(folder)))


def message_user_id(frame: zmq.Frame) -> str | None:
    """The CURVE public key (z85) a received message was authenticated with; None on a plain socket."""
    try:
        # A named metadata property is a str (only numeric socket options read back as int).
        return cast(str, frame.get("User-Id"))
    except zmq.ZMQError:
        return None


@dataclass(frozen=True)
class AllowListRefresh:
    """What a re-read of the allowed-keys folders found, per ZAP domain."""

    allowed: dict[str, int]  # keys allowed now
    revoked: dict[str, int]  # keys allowed before and not any more


class ClientAllowList:
    """The ZAP authenticator of the daemon's CURVE servers: one folder of allowed keys per domain.

    The same key sets answer the handshakes (through ZAP) and :meth:`is_allowed`, the check of each
    received message's authenticated key, so both change together on :meth:`refresh`.
    """

    def __init__(self, context: zmq.Context, folders: dict[str, Path]) -> None:
        self.folders = {domain: Path(folder) for domain, folder in folders.items()}
        for folder in self.folders.values():
            if not folder.is_dir():
                raise ValueError(f"allowed client keys folder {folder} does not exist")
        self._keys: dict[str, frozenset[str]] = {domain: frozenset() for domain in self.folders}
        self._lock = threading.Lock()
        self.refresh()
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        for domain in self.folders:
            self._authenticator.configure_curve_callback(domain=domain, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials provider: is this client key (z85) allowed in this domain?"""
        return self.is_allowed(domain, key.decode("ascii", errors="replace"))

    def is_allowed(self, domain: str, user_id: str | None) -> bool:
        return user_id is not None and user_id in self._keys.get(domain, frozenset())

    def refresh(self) -> AllowListRefresh:
        """Re-read every folder; a key missing from its folder now is refused from now on."""
        fresh = {domain: load_public_keys(folder) for domain, folder in self.folders.items()}
        with self._lock:
            revoked = {domain: len(self._keys[domain] - keys) for domain, keys in fresh.items()}
            self._keys = fresh  # one reference assignment: readers see the old or the new sets
        return AllowListRefresh(allowed={d: len(k) for d, k in fresh.items()}, revoked=revoked)

    def stop(self) -> None:
        self._authenticator.stop()
