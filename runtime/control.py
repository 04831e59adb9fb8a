"""The daemon's control channel: a REP socket on loopback taking one JSON request at a time.

Requests are JSON objects ``{"cmd": ..., ...}``; a plain-text form (``reload /path``,
``threshold 0.42``, ``status``) is accepted too so an operator can use any ZeroMQ client. Replies
are JSON objects with ``"ok": true|false``.

- ``{"cmd": "status"}``: model, threshold, queues, counters.
- ``{"cmd": "reload", "path": "/bundles/v7"}``: load, self-check and swap to that bundle (or the
  current folder again, re-reading bundle.json, when ``path`` is omitted). Only bundles inside the
  daemon's reload locations are loaded. A failure keeps the old model serving and replies
  ``ok: false`` with the reason.
- ``{"cmd": "threshold"}`` reads the threshold; ``{"cmd": "threshold", "value": 0.42}`` overrides
  it until the next reload, within the bundle's score range. To change it permanently use
  ``llb-edge bundle set-threshold`` and reload.

Who may send them: with CURVE configured the socket is a CURVE server and only operator keys in
the daemon's ``control_allowed`` folder get an answer; without CURVE it must be bound to a local
endpoint (loopback TCP or ipc), so it is as private as the machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from llb_edge.errors import LLBEdgeError
from llb_edge.runtime.keys import configure_client

COMMANDS = ("status", "reload", "threshold")
# Where `llb-edge ctl`, promote, rollback and retrain --notify find their CURVE keys by default.
SECRET_ENV = "LLB_EDGE_CTL_SECRET"  # the operator's .key_secret
SERVER_KEY_ENV = "LLB_EDGE_CTL_SERVER_KEY"  # the daemon's public server .key


class ControlError(LLBEdgeError, RuntimeError):
    """The daemon did not answer, or answered something that is not a control reply."""


@dataclass(frozen=True)
class ControlKeys:
    """An operator's CURVE key pair and the daemon's public key, for a CURVE-protected control socket."""

    secret: Path  # the operator's .key_secret (its .key must be in the daemon's control_allowed folder)
    server_public: Path  # the daemon's server .key

    @classmethod
    def from_env(cls) -> ControlKeys | None:
        """Keys named by $LLB_EDGE_CTL_SECRET and $LLB_EDGE_CTL_SERVER_KEY, or None when unset."""
        secret, server = os.environ.get(SECRET_ENV), os.environ.get(SERVER_KEY_ENV)
        if not secret and not server:
            return None
        if not secret or not server:
            raise ControlError(f"set both {SECRET_ENV} and {SERVER_KEY_ENV} (or neither)")
        return cls(Path(secret), Path(server))


@dataclass(frozen=True)
class ControlRequest:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


def parse_control_request(data: bytes) -> ControlRequest:
    """Parse a request; ValueError with a message meant for the operator if it is not one."""
    text = data.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"request is not valid JSON: {err}") from err
        if not isinstance(values, dict) or not isinstance(values.get("cmd"), str):
            raise ValueError('request must be a JSON object with a "cmd" string')
        cmd = values.pop("cmd")
        args = values
    else:
        words = text.split(maxsplit=1)
        if not words:
            raise ValueError("empty request")
        cmd = words[0]
        argument = words[1] if len(words) > 1 else None
        args = {}
        if argument is not None:
            args = {"path": argument} if cmd == "reload" else {"value": argument}
    if cmd not in COMMANDS:
        raise ValueError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    if cmd == "threshold" and args.get("value") is not None:
        value = args["value"]
        try:
            if isinstance(value, bool):
                raise TypeError("a boolean is not a threshold")
            args["value"] = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"threshold value must be a number, got {value!r}") from err
    if cmd == "reload" and args.get("path") is not None and not isinstance(args["path"], str):
        raise ValueError(f"reload path must be a string, got {args['path']!r}")
    return ControlRequest(cmd=cmd, args=args)


def send_control(
    endpoint: str,
    cmd: str,
    *,
    timeout_s: float = 10.0,
    context: zmq.Context | None = None,
    keys: ControlKeys | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Send one command to a daemon's control socket and return its JSON reply.

    ``keys`` (default: ``ControlKeys.from_env()``) authenticate to a CURVE-protected daemon. A
    reload loads and self-checks a model before replying, so allow it several seconds on a big
    model. Raises ControlError when no reply comes within ``timeout_s``.
    """
    keys = keys or ControlKeys.from_env()
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = int(timeout_s * 1000)
    sock.sndtimeo = int(timeout_s * 1000)
    try:
        if keys is not None:
            try:
                configure_client(sock, keys.secret, keys.server_public)
            except (OSError, ValueError) as err:
                raise ControlError(f"cannot use the control keys: {err}") from err
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": cmd, **args}).encode())
        reply = sock.recv()
    except zmq.Again as err:
        hint = "is the daemon running? with CURVE, are the control keys right and allowed?"
        raise ControlError(f"no reply from {endpoint} within {timeout_s} s ({hint})") from err
    finally:
        sock.close()
    try:
        values = json.loads(reply)
    except json.JSONDecodeError as err:
        raise ControlError(f"reply from {endpoint} is not JSON: {reply[:200]!r}") from err
    if not isinstance(values, dict):
        raise ControlError(f"reply from {endpoint} is not a JSON object")
    return values
