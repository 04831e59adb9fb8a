"""Versioned bundle folder: promotion, rollback and their history (torch-free; runs on a line PC).

Layout (docs/retrain.md)::

    <root>/current                      the current version's name (one line, replaced atomically)
    <root>/history.jsonl                one line per promote / rollback: who, when, why, what was told
    <root>/versions/<version>/bundle/   an installed bundle (a verified copy, never edited afterwards)
    <root>/versions/<version>/report/   the retrain report that justified it, when there was one
    <root>/versions/<version>/installed.json

`llb-edge serve ROOT` serves the current version (``resolve_bundle_dir``), so a reload without a
path, or a restart, follows the pointer. ``promote`` / ``rollback`` also tell running daemons over
their control sockets to hot-reload the new current bundle, and record each daemon's answer.

Rollback walks back the chain of promotions: promote pushes a version, rollback pops one, so two
rollbacks after three promotions return to the first version.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llb_edge.bundle import MANIFEST_NAME, load_bundle, operator_name, utc_now
from llb_edge.errors import LLBEdgeError

CURRENT_FILE = "current"
HISTORY_FILE = "history.jsonl"
VERSIONS_DIR = "versions"
BUNDLE_DIR = "bundle"
REPORT_DIR = "report"
INSTALLED_FILE = "installed.json"
LOCK_FILE = ".lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class VersionError(LLBEdgeError, RuntimeError):
    """A versions folder that cannot do what was asked (no previous version, a clashing version...)."""


@dataclass
class VersionChange:
    """What a promote or rollback did, and what each notified daemon answered."""

    action: str  # promote | rollback
    version: str  # now current
    previous: str | None
    bundle_dir: Path
    by: str
    at: str
    reason: str
    notified: dict[str, dict[str, Any]] = field(default_factory=dict)  # endpoint -> {ok, model_version, error}

    @property
    def all_reloaded(self) -> bool:
        """True when every notified daemon reloaded and now serves this version."""
        return all(reply.get("ok") for reply in self.notified.values())

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["bundle_dir"] = str(self.bundle_dir)
        return values


def version_name(model_version: str) -> str:
    """A folder-safe version name from a bundle's model_version."""
    name = _UNSAFE.sub("_", model_version.strip()).strip("._")
    return name or "unnamed"


def current_version(root: str | Path) -> str | None:
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def version_bundle_dir(root: str | Path, version: str) -> Path:
    return Path(root) / VERSIONS_DIR / version / BUNDLE_DIR


def current_bundle(root: str | Path) -> Path:
    """The current version's bundle folder; VersionError when nothing was promoted yet."""
    version = current_version(root)
    if version is None:
        raise VersionError(f"{root} has no current version (promote a bundle first: llb-edge promote)")
    path = version_bundle_dir(root, version)
    if not path.is_dir():
        raise VersionError(f"{root}/{CURRENT_FILE} names version {version!r}, but {path} does not exist")
    return path


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder as is; a versions root as its current version's bundle."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file() and (path / CURRENT_FILE).is_file():
        return current_bundle(path)
    return path


def list_versions(root: str | Path) -> list[str]:
    folder = Path(root) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_history(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / HISTORY_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def version_chain(root: str | Path) -> list[str]:
    """The promotions still in effect, oldest first; the last one is current."""
    chain: list[str] = []
    for entry in read_history(root):
        if entry.get("action") == "promote":
            if not chain or chain[-1] != str(entry["version"]):  # re-promoting the current one changes nothing
                chain.append(str(entry["version"]))
        elif entry.get("action") == "rollback" and chain:
            chain.pop()
    current = current_version(root)
    if current is not None and (not chain or chain[-1] != current):
        chain.append(current)  # the pointer was changed by hand: trust it
    return chain


# ------------------------------------------------------------------------------------- changes


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One promote/rollback at a time per root (two retrains finishing together, an operator)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as documented
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_text_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _append_history(root: Path, entry: dict[str, Any]) -> None:
    with open(root / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _same_bundle(a: Path, b: Path) -> bool:
    return (a / MANIFEST_NAME).read_bytes() == (b / MANIFEST_NAME).read_bytes()


def _install(root: Path, bundle_dir: Path, version: str, report_dir: Path | None, by: str, reason: str) -> Path:
    """Copy the bundle (and report) to versions/<version>/, verified, appearing in one rename."""
    target = root / VERSIONS_DIR / version
    if target.exists():
        if not _same_bundle(target / BUNDLE_DIR, bundle_dir):
            raise VersionError(f"version {version!r} is already installed in {root} with a different bundle; "
                               "export the new one with another model version")
        return target / BUNDLE_DIR
    staging = target.with_name(f".{version}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(bundle_dir, staging / BUNDLE_DIR)
        load_bundle(staging / BUNDLE_DIR, verify=True)  # a copy that does not verify is never installed
        if report_dir is not None and Path(report_dir).is_dir():
            shutil.copytree(report_dir, staging / REPORT_DIR)
        info = {"version": version, "source": str(Path(bundle_dir).resolve()), "installed_at": utc_now(),
                "by": by, "reason": reason}
        (staging / INSTALLED_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / BUNDLE_DIR


def notify_daemons(
    endpoints: Sequence[str], bundle_dir: Path, expected_version: str, timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Ask each daemon to hot-reload ``bundle_dir``; {endpoint: {ok, model_version, error}}.

    A daemon that is down or refuses the bundle keeps serving what it had; that is reported, not
    raised, so one unreachable line PC does not stop the others from being updated.
    """
    if not endpoints:
        return {}
    from llb_edge.runtime.control import ControlError, send_control  # pyzmq only when there is a daemon

    replies: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        try:
            reply = send_control(endpoint, "reload", path=str(bundle_dir.resolve()), timeout_s=timeout_s)
        except ControlError as err:
            replies[endpoint] = {"ok": False, "error": str(err)}
            continue
        served = (reply.get("model") or {}).get("model_version")
        ok = bool(reply.get("ok")) and served == expected_version
        entry: dict[str, Any] = {"ok": ok, "model_version": served}
        if not ok:
            entry["error"] = reply.get("error") or f"daemon serves {served!r}, expected {expected_version!r}"
        replies[endpoint] = entry
    return replies


def _change(
    root: Path, action: str, version: str, previous: str | None, bundle: Path, by: str | None, reason: str,
    notify_endpoints: Sequence[str], timeout_s: float,
) -> VersionChange:
    _write_text_atomically(root / CURRENT_FILE, version + "\n")
    model_version = load_bundle(bundle, verify=False).manifest.model_version
    change = VersionChange(action=action, version=version, previous=previous, bundle_dir=bundle,
                           by=by or operator_name(), at=utc_now(), reason=reason)
    change.notified = notify_daemons(notify_endpoints, bundle, model_version, timeout_s)
    _append_history(root, change.to_dict())
    return change


def promote(
    root: str | Path,
    bundle_dir: str | Path,
    report_dir: str | Path | None = None,
    notify_endpoints: Sequence[str] = (),
    *,
    reason: str = "",
    by: str | None = None,
    timeout_s: float = 30.0,
) -> VersionChange:
    """Install ``bundle_dir`` as a new version of ``root`` (copy + its report), make it current, and
    tell the daemons at ``notify_endpoints`` to hot-reload it. Promoting an installed version again
    (same bundle.json) just makes it current."""
    root, bundle_dir = Path(root), Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=True)
    version = version_name(bundle.manifest.model_version)
    with _locked(root):
        previous = current_version(root)
        installed = _install(root, bundle_dir, version, Path(report_dir) if report_dir else None,
                             by or operator_name(), reason)
        return _change(root, "promote", version, previous, installed, by, reason or "promote", notify_endpoints,
                       timeout_s)


def rollback(
    root: str | Path,
    notify_endpoints: Sequence[str] = (),
    *,
    reason: str = "",
    by: str | None = None,
    timeout_s: float = 30.0,
) -> VersionChange:
    """Make the version promoted before the current one current again, and tell the daemons."""
    root = Path(root)
    with _locked(root):
        chain = version_chain(root)
        if len(chain) < 2:
            raise VersionError(f"{root} has no previous version to roll back to (history: {chain or 'empty'})")
        current, target = chain[-1], chain[-2]
        bundle = version_bundle_dir(root, target)
        load_bundle(bundle, verify=True)  # refuse before touching the pointer
        return _change(root, "rollback", target, current, bundle, by, reason or "rollback", notify_endpoints,
                       timeout_s)
