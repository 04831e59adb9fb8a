"""Run `llb-edge serve` as a child process and follow its JSON log events.

For whatever supervises a daemon from Python: a plant's own launcher, the benchmarks, the tests.
The daemon logs one JSON object per line on stderr (runtime/logs.py); events such as "serving"
(with the bound endpoints), "reloaded" and "stopped" (with the final counters) are read here.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class DaemonProcess:
    """A daemon subprocess whose stderr is read on a thread and parsed into events."""

    def __init__(self, command: list[str], cwd: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=cwd, env=env)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self.events.put(entry)

    def wait_for(self, event: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next log entry of ``event``; raises (with the daemon's stderr) on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                entry = self.events.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if entry.get("event") == event:
                return entry
        raise RuntimeError(f"no {event!r} event from the daemon; its stderr:\n{''.join(self.lines)[-3000:]}")

    def logged(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == event:
                    found.append(entry)
        return found

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """SIGTERM (graceful: queued frames are finished); returns the daemon's 'stopped' event."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        stopped = self.logged("stopped")
        return stopped[-1] if stopped else None
