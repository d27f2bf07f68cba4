"""Two slots (A/B) and an atomically written state file: the device never runs nothing.

Layout under ``data_dir``::

    state.json            which slot is active, what is being installed, crash records
    slots/A/, slots/B/    unpacked bundles (manifest.json, signature.json, model, golden.npz, …,
                          slot.json with the bundle id, name, version, deployment)
    downloads/            transfers in progress (see edgepack.agent.transfer)

Install state machine (``phase`` in ``state.json``)::

    idle → downloading → verifying → staged → health_checking → committed (idle, new slot active)
                                                              ↘ rolled-back (idle, old slot active)

``state.json`` is only ever replaced whole (temp file, fsync, rename, fsync directory), and the
active slot is switched by that one rename, after the new slot is fully written and fsynced.
A kill -9 or power cut at any moment therefore leaves the old bundle active (phase ≠ idle: the
install is redone from the verified download) or the new one (committed).

Crash loops: the agent marks ``running`` at start and clears it on a clean exit. An unclean
start within ``crash_window_s`` of a commit counts as a crash of the new bundle; ``max_crashes``
of them roll back to the previous slot, and that bundle is not installed again for the same
deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import Bundle, sha256_file
from edgepack.agent.crashpoint import crash_point
from edgepack.agent.errors import InstallError
from edgepack.agent.transfer import atomic_write

__all__ = ["SLOTS", "PHASES", "SlotInfo", "BootReport", "Installer"]

SLOTS = ("A", "B")
PHASES = ("idle", "downloading", "verifying", "staged", "health_checking")
STATE_SCHEMA = "edgepack.agent-state/1"
_MAX_FAILED = 32


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds."""

    slot: str
    bundle_id: str
    name: str
    version: str
    target: str = ""
    deployment_id: str = ""
    runtime: str = ""
    format: str = ""
    installed_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public(self) -> dict[str, Any]:
        """The fields the state message carries."""
        return {"bundle_id": self.bundle_id, "name": self.name, "version": self.version,
                "deployment_id": self.deployment_id, "slot": self.slot,
                "installed_at": self.installed_at}


@dataclass(frozen=True)
class BootReport:
    """What :meth:`Installer.boot` found."""

    unclean: bool  # the previous run did not exit cleanly
    crashes: int  # crashes of the active bundle within the crash window
    rolled_back: SlotInfo | None  # the bundle abandoned for crash-looping
    interrupted: dict | None  # the install that was in progress ({"phase", "bundle_id", …})


def _empty_state() -> dict[str, Any]:
    return {"schema": STATE_SCHEMA, "active": None, "previous": None, "slots": {"A": None,
            "B": None}, "phase": "idle", "candidate": None, "committed_at": None,
            "crashes": [], "running": False, "failed": [], "handled": None}


class Installer:
    """Owns ``state.json`` and the slots under ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "slots").mkdir(exist_ok=True)
        self.downloads = self.root / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.state_path = self.root / "state.json"
        self.state = self._load()

    # ---- state file
    def _load(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return _empty_state()
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(f"{self.state_path} is unreadable ({exc}). It is only ever "
                               "replaced atomically, so the disk may be failing; move it aside "
                               "to start over (the slots stay).") from None
        base = _empty_state()
        base.update(state)
        return base

    def save(self) -> None:
        atomic_write(self.state_path, json.dumps(self.state, indent=1, sort_keys=True).encode())

    # ---- queries
    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def info(self, slot: str | None) -> SlotInfo | None:
        if slot not in SLOTS:
            return None
        d = self.state["slots"].get(slot)
        return SlotInfo(**d) if d else None

    @property
    def active(self) -> SlotInfo | None:
        return self.info(self.state["active"])

    @property
    def previous(self) -> SlotInfo | None:
        return self.info(self.state["previous"])

    @property
    def phase(self) -> str:
        return self.state["phase"]

    def active_dir(self) -> Path | None:
        a = self.state["active"]
        return self.slot_dir(a) if a in SLOTS else None

    def inactive_slot(self) -> str:
        return "B" if self.state["active"] == "A" else "A"

    def is_failed(self, deployment_id: str, bundle_id: str) -> dict | None:
        for f in self.state["failed"]:
            if f["deployment_id"] == deployment_id and f["bundle_id"] == bundle_id:
                return f
        return None

    def slot_intact(self, slot: str) -> bool:
        """The slot's model file still matches the manifest's hash (catches SD-card rot)."""
        d = self.slot_dir(slot)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            return sha256_file(d / manifest["model"]["file"]) == manifest["model"]["sha256"]
        except (OSError, ValueError, KeyError):
            return False

    # ---- transitions
    def boot(self, *, crash_window_s: float, max_crashes: int,
             now: float | None = None) -> BootReport:
        """Call once at agent start: record crashes, roll back a crash loop, reset a torn
        install."""
        now = time.time() if now is None else now
        s = self.state
        unclean = bool(s.get("running"))
        rolled = None
        interrupted = None
        if s["phase"] != "idle":
            interrupted = {"phase": s["phase"], **(s.get("candidate") or {})}
            s["phase"], s["candidate"] = "idle", None
        committed = s.get("committed_at")
        if unclean and committed and now - committed <= crash_window_s and s["active"]:
            s["crashes"] = [t for t in s["crashes"] if now - t <= crash_window_s] + [now]
            if len(s["crashes"]) >= max_crashes and self.previous is not None \
                    and self.slot_intact(s["previous"]):
                rolled = self.active
                self._swap_back(now)
                if rolled is not None:
                    self._record_failed(rolled.deployment_id, rolled.bundle_id, "crash_loop",
                                        f"{len(s['crashes'])} crashes within "
                                        f"{crash_window_s:g}s of commit", now)
                s["crashes"] = []
        s["running"] = True
        self.save()
        return BootReport(unclean=unclean, crashes=len(s["crashes"]), rolled_back=rolled,
                          interrupted=interrupted)

    def clean_exit(self) -> None:
        self.state["running"] = False
        self.save()

    def set_phase(self, phase: str, candidate: dict | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(phase)
        self.state["phase"] = phase
        if candidate is not None or phase == "idle":
            self.state["candidate"] = candidate
        self.save()

    def stage(self, bundle: Bundle, deployment_id: str) -> SlotInfo:
        """Unpack ``bundle`` into the inactive slot (fsynced); the active slot is untouched."""
        slot = self.inactive_slot()
        s = self.state
        if s["previous"] == slot:
            s["previous"] = None  # that bundle is about to be overwritten
        s["slots"][slot] = None
        s["phase"] = "verifying"
        s["candidate"] = {"bundle_id": bundle.bundle_id, "deployment_id": deployment_id,
                          "slot": slot, "name": bundle.name, "version": bundle.version}
        self.save()
        final = self.slot_dir(slot)
        tmp = self.root / "slots" / f".{slot}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        bundle.extract(tmp)
        m = bundle.manifest
        info = SlotInfo(slot=slot, bundle_id=bundle.bundle_id, name=bundle.name,
                        version=bundle.version, target=bundle.target,
                        deployment_id=deployment_id,
                        runtime=str(m.get("runtime", {}).get("name", "")),
                        format=str(m["model"]["format"]), installed_at=time.time())
        atomic_write(tmp / "slot.json", json.dumps(info.to_dict()).encode())
        _fsync_dir(tmp)
        crash_point("staging")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        s["slots"][slot] = info.to_dict()
        s["phase"] = "staged"
        self.save()
        crash_point("staged")
        return info

    def commit(self, slot: str, now: float | None = None) -> SlotInfo:
        """Make ``slot`` active (one atomic rename of ``state.json``)."""
        s = self.state
        info = self.info(slot)
        if info is None:
            raise InstallError(f"slot {slot} holds no staged bundle")
        s["previous"], s["active"] = s["active"], slot
        s["phase"], s["candidate"] = "idle", None
        s["committed_at"] = time.time() if now is None else now
        s["crashes"] = []
        # "handled" is set by the agent once the install is reported (mark_handled)
        crash_point("committing")
        self.save()
        crash_point("committed")
        return info

    def abandon(self, deployment_id: str, bundle_id: str, kind: str, detail: str, *,
                slot: str | None = None) -> None:
        """Give up on a candidate (rejected, health check failed): the active slot stays.

        ``slot``: the inactive slot the candidate was staged into, emptied to free the disk.
        """
        s = self.state
        s["phase"], s["candidate"] = "idle", None
        if slot in SLOTS and slot != s["active"] and slot != s["previous"]:
            s["slots"][slot] = None
        self._record_failed(deployment_id, bundle_id, kind, detail, time.time())
        self.save()
        if slot in SLOTS and s["slots"].get(slot) is None:
            shutil.rmtree(self.slot_dir(slot), ignore_errors=True)

    def rollback(self, kind: str, detail: str) -> SlotInfo | None:
        """Return to the previous slot (the active bundle misbehaves); None if there is none."""
        bad = self.active
        if self.previous is None or not self.slot_intact(self.state["previous"]):
            return None
        self._swap_back(time.time())
        if bad is not None:
            self._record_failed(bad.deployment_id, bad.bundle_id, kind, detail, time.time())
        self.save()
        return self.active

    def mark_handled(self, deployment_id: str) -> None:
        self.state["handled"] = deployment_id
        self.save()

    def _swap_back(self, now: float) -> None:
        s = self.state
        s["active"], s["previous"] = s["previous"], None
        s["committed_at"] = None
        s["phase"], s["candidate"] = "idle", None

    def _record_failed(self, deployment_id: str, bundle_id: str, kind: str, detail: str,
                       now: float) -> None:
        failed = [f for f in self.state["failed"]
                  if not (f["deployment_id"] == deployment_id and f["bundle_id"] == bundle_id)]
        failed.append({"deployment_id": deployment_id, "bundle_id": bundle_id, "kind": kind,
                       "detail": detail, "ts": now})
        self.state["failed"] = failed[-_MAX_FAILED:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
