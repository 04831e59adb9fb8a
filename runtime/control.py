"""The daemon's control channel: a REP socket on loopback taking one JSON request at a time.

Requests are JSON objects ``{"cmd": ..., ...}``; a plain-text form (``reload /path``,
``threshold 0.42``, ``status``) is accepted too so an operator can use any ZeroMQ client. Replies
are JSON objects with ``"ok": true|false``.

- ``{"cmd": "status"}``: model, threshold, queues, counters.
- ``{"cmd": "reload", "path": "/bundles/v7"}``: load, self-check and swap to that bundle (or the
  current folder again, re-reading bundle.json, when ``path`` is omitted). A failure keeps the old
  model serving and replies ``ok: false`` with the reason.
- ``{"cmd": "threshold"}`` reads the threshold; ``{"cmd": "threshold", "value": 0.42}`` overrides
  it until the next reload. To change it permanently use ``llb-edge bundle set-threshold`` and reload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import zmq

from llb_edge.errors import LLBEdgeError

COMMANDS = ("status", "reload", "threshold")


class ControlError(LLBEdgeError, RuntimeError):
    """The daemon did not answer, or answered something that is not a control reply."""


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
        try:
            args["value"] = float(args["value"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"threshold value must be a number, got {args['value']!r}") from err
    return ControlRequest(cmd=cmd, args=args)


def send_control(
    endpoint: str,
    cmd: str,
    *,
    timeout_s: float = 10.0,
    context: zmq.Context | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Send one command to a daemon's control socket and return its JSON reply.

    A reload loads and self-checks a model before replying, so allow it several seconds on a big
    model. Raises ControlError when no reply comes within ``timeout_s``.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = int(timeout_s * 1000)
    sock.sndtimeo = int(timeout_s * 1000)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": cmd, **args}).encode())
        reply = sock.recv()
    except zmq.Again as err:
        raise ControlError(f"no reply from {endpoint} within {timeout_s} s (is the daemon running?)") from err
    finally:
        sock.close()
    try:
        values = json.loads(reply)
    except json.JSONDecodeError as err:
        raise ControlError(f"reply from {endpoint} is not JSON: {reply[:200]!r}") from err
    if not isinstance(values, dict):
        raise ControlError(f"reply from {endpoint} is not a JSON object")
    return values
