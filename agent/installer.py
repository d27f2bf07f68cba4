"""Two slots (A/B) and an atomically written state file: the device never runs nothing.

Layout under ``data_dir``::

    state.json            which slot is active, what is being installed, crash records
    slots/A/, slots/B/    unpacked bundles (manifest.json, signature.json, model, golden.npz, …,
                          slot.json with the bundle id, name, version, deployment)
    downloads/            transfers in progress (see edgepack.agent.transfer)

The install state machine (``phase``, ``candidate`` and ``last`` in ``state.json``) is
:mod:`edgepack.agent.states`; this module persists it with every transition and does the slot
work of the transitions that change slots (stage, commit, abandon, roll back).

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
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import Bundle, sha256_file
from edgepack.agent.crashpoint import crash_point
from edgepack.agent.errors import InstallError
from edgepack.agent.files import atomic_write, fsync_dir
from edgepack.agent.states import Candidate, InstallState, Outcome, Phase, Resume, resume

__all__ = ["SLOTS", "STATE_SCHEMA", "SlotInfo", "BootReport", "DeviceState", "Installer",
           "read_state"]

SLOTS = ("A", "B")
STATE_SCHEMA = "edgepack.agent-state/1"
_MAX_FAILED = 32
log = logging.getLogger("edgepack.agent")


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
    interrupted: InstallState | None  # the install that was in progress (phase ≠ idle)
    resume: Resume = Resume.NOTHING  # what happens to it (states.RESUME)


@dataclass(frozen=True)
class DeviceState:
    """What ``state.json`` says, typed: for readers other than the agent (inference CLI)."""

    active: SlotInfo | None
    previous: SlotInfo | None
    install: InstallState


def _empty_state() -> dict[str, Any]:
    return {"schema": STATE_SCHEMA, "active": None, "previous": None, "slots": {"A": None,
            "B": None}, "committed_at": None, "crashes": [], "running": False, "failed": [],
            "handled": None}


def read_state(data_dir: str | os.PathLike) -> DeviceState:
    """Read ``data_dir/state.json`` without changing anything; InstallError if unusable."""
    path = Path(data_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
        problem = _state_problem(state)
    except (OSError, ValueError, RecursionError) as exc:
        problem = f"unreadable ({exc})"
    if problem is not None:
        raise InstallError(f"{path} is {problem}", path=str(path))
    slots = state["slots"]

    def info(key: str) -> SlotInfo | None:
        entry = slots.get(state.get(key)) if state.get(key) in SLOTS else None
        return SlotInfo(**entry) if entry else None

    return DeviceState(info("active"), info("previous"), InstallState.from_dict(state))


class Installer:
    """Owns ``state.json`` and the slots under ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "slots").mkdir(exist_ok=True)
        self.downloads = self.root / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.state_path = self.root / "state.json"
        #: where the install machine is (persisted with the rest of state.json)
        self.install = InstallState()
        self.state = self._load()

    # ---- state file
    def _load(self) -> dict[str, Any]:
        #: why state.json could not be used (None: it was fine); see recovery_candidates()
        self.damaged: str | None = None
        if not self.state_path.exists():
            if any((self.slot_dir(s) / "slot.json").exists() for s in SLOTS):
                self.damaged = f"{self.state_path} is missing but the slots hold bundles"
            return _empty_state()
        try:
            state = json.loads(self.state_path.read_text())
            problem = _state_problem(state)
        except (OSError, ValueError, RecursionError) as exc:
            problem = f"unreadable ({exc})"
        if problem is None:
            self.install = InstallState.from_dict(state)
            base = _empty_state()
            base.update({k: v for k, v in state.items()
                         if k not in ("phase", "candidate", "last")})
            return base
        # It is only ever replaced atomically, so the disk is failing or someone edited it: keep
        # it for inspection and start from what the slots hold (the agent health-checks a slot
        # before serving it again).
        aside = self.state_path.with_name(f"{self.state_path.name}.damaged-{int(time.time())}")
        try:
            os.replace(self.state_path, aside)
            where = f"moved aside to {aside.name}"
        except OSError as exc:
            where = f"cannot be moved aside ({exc})"
        self.damaged = f"{self.state_path} is {problem}; {where}"
        return _empty_state()

    def save(self, *, critical: bool = False) -> None:
        """Replace state.json atomically.

        On a full or failing disk a routine record (phase, crash marks, failures) stays in
        memory and is written with the next change; a ``critical`` one (what is active, what a
        slot holds) raises InstallError, and the caller puts the state back as it was.
        """
        try:
            atomic_write(self.state_path, json.dumps({**self.state, **self.install.to_dict()},
                                                     indent=1, sort_keys=True).encode())
        except OSError as exc:
            if critical:
                raise InstallError(f"cannot write {self.state_path}: {exc}. Nothing changed; "
                                   "free space on the device.") from None
            log.warning("cannot write %s (%s); the change is kept in memory and written with "
                        "the next one", self.state_path, exc)

    def _snapshot(self) -> tuple[dict[str, Any], InstallState]:
        return json.loads(json.dumps(self.state)), self.install

    def _critical(self, before: tuple[dict[str, Any], InstallState]) -> None:
        """Save, or restore ``before`` (a :meth:`_snapshot`) and raise."""
        try:
            self.save(critical=True)
        except InstallError:
            self.state, self.install = before
            raise

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
    def phase(self) -> Phase:
        return self.install.phase

    @property
    def handled(self) -> str | None:
        """The deployment whose outcome was last reported."""
        return self.state.get("handled")

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

    def recovery_candidates(self) -> list[SlotInfo]:
        """Slots holding a complete bundle (slot.json, model matching its hash), newest first:
        what an agent whose state file was lost can serve again, after a health check."""
        found = []
        for slot in SLOTS:
            try:
                doc = json.loads((self.slot_dir(slot) / "slot.json").read_text())
                info = SlotInfo(**{**doc, "slot": slot})
            except (OSError, ValueError, TypeError):
                continue
            if self.slot_intact(slot):
                found.append(info)
        return sorted(found, key=lambda i: i.installed_at, reverse=True)

    def adopt(self, info: SlotInfo) -> None:
        """Make a recovered slot active (it passed a health check); no previous bundle."""
        before = self._snapshot()
        s = self.state
        s["slots"] = {slot: (info.to_dict() if slot == info.slot else None) for slot in SLOTS}
        s["active"], s["previous"], s["committed_at"] = info.slot, None, None
        self.install = InstallState(last=self.install.last)
        self._critical(before)

    def deactivate(self) -> None:
        """Forget an active bundle that cannot be served and has no previous one to return
        to, so that the desired state installs it afresh instead of naming a broken slot."""
        s = self.state
        if s["active"] in SLOTS:
            s["slots"][s["active"]] = None
        s["active"], s["committed_at"] = None, None
        self.save()

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
        interrupted = self.install if self.install.phase != Phase.IDLE else None
        self.install, rule = resume(self.install)
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
                          interrupted=interrupted, resume=rule)

    def clean_exit(self) -> None:
        self.state["running"] = False
        self.save()

    def advance(self, phase: Phase, candidate: Candidate | None = None) -> InstallState:
        """Take the transition to ``phase`` (states.TRANSITIONS) and persist it."""
        self.install = self.install.to(phase, candidate=candidate, now=time.time())
        self.save()
        return self.install

    def stage(self, bundle: Bundle, deployment_id: str) -> SlotInfo:
        """verifying → staged: unpack ``bundle`` into the inactive slot (fsynced); the active
        slot is untouched. From idle (a bundle file at hand), the machine passes through
        downloading and verifying first."""
        slot = self.inactive_slot()
        s = self.state
        before = self._snapshot()
        if s["previous"] == slot:
            s["previous"] = None  # that bundle is about to be overwritten
        s["slots"][slot] = None
        cand = Candidate(bundle.bundle_id, deployment_id, bundle.name, bundle.version, slot)
        st = self.install
        if st.phase == Phase.IDLE:
            st = st.to(Phase.DOWNLOADING, candidate=cand)
        if st.phase == Phase.DOWNLOADING:
            st = st.to(Phase.VERIFYING)
        if st.phase != Phase.VERIFYING:
            raise InstallError(f"cannot stage a bundle in phase {st.phase}")
        attempts = st.candidate.attempts if st.candidate else 0
        self.install = replace(st, candidate=replace(cand, attempts=attempts))
        self._critical(before)  # the slot must not be named on disk while it is rewritten
        s = self.state
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
        fsync_dir(tmp)
        crash_point("staging")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        before = self._snapshot()
        s["slots"][slot] = info.to_dict()
        self.install = self.install.to(Phase.STAGED)
        self._critical(before)
        crash_point("staged")
        return info

    def commit(self, slot: str, now: float | None = None) -> SlotInfo:
        """health_checking → committed: make ``slot`` active (one atomic rename of
        ``state.json``, which also returns the machine to idle)."""
        s = self.state
        info = self.info(slot)
        if info is None:
            raise InstallError(f"slot {slot} holds no staged bundle")
        before = self._snapshot()
        now = time.time() if now is None else now
        self.install = self.install.to(Phase.COMMITTED, now=now)
        s["previous"], s["active"] = s["active"], slot
        s["committed_at"] = now
        s["crashes"] = []
        # "handled" is set by the agent once the install is reported (mark_handled)
        crash_point("committing")
        self._critical(before)
        crash_point("committed")
        return info

    def abandon(self, deployment_id: str, bundle_id: str, kind: str, detail: str, *,
                slot: str | None = None) -> None:
        """Give up on a candidate (rejected, health check failed): the active slot stays.

        The outcome follows ``kind``: ``rejected:*`` → rejected, ``health_failed`` →
        rolled_back, anything else → failed. ``slot``: the inactive slot the candidate was
        staged into, emptied to free the disk.
        """
        s = self.state
        outcome = (Phase.REJECTED if kind.startswith("rejected") else Phase.ROLLED_BACK
                   if kind == "health_failed" else Phase.FAILED)
        cand = self.install.candidate or Candidate(bundle_id, deployment_id)
        if self.install.phase == Phase.IDLE:  # refused before any work started
            self.install = InstallState(last=Outcome(outcome, deployment_id, bundle_id, kind,
                                                     time.time()))
        else:
            self.install = self.install.to(outcome, candidate=cand, reason=kind,
                                           now=time.time())
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
        before = self._snapshot()
        self._swap_back(time.time())
        if bad is not None:
            self._record_failed(bad.deployment_id, bad.bundle_id, kind, detail, time.time())
            # not a transition: the machine is idle; the active bundle is replaced under it
            self.install = replace(self.install, last=Outcome(
                Phase.ROLLED_BACK, bad.deployment_id, bad.bundle_id, kind, time.time()))
        self._critical(before)
        return self.active

    def mark_handled(self, deployment_id: str) -> None:
        self.state["handled"] = deployment_id
        self.save()

    def _swap_back(self, now: float) -> None:
        s = self.state
        s["active"], s["previous"] = s["previous"], None
        s["committed_at"] = None
        self.install = InstallState(last=self.install.last)

    def _record_failed(self, deployment_id: str, bundle_id: str, kind: str, detail: str,
                       now: float) -> None:
        failed = [f for f in self.state["failed"]
                  if not (f["deployment_id"] == deployment_id and f["bundle_id"] == bundle_id)]
        failed.append({"deployment_id": deployment_id, "bundle_id": bundle_id, "kind": kind,
                       "detail": detail, "ts": now})
        self.state["failed"] = failed[-_MAX_FAILED:]


def _state_problem(state: Any) -> str | None:
    """What makes a parsed state.json unusable, or None."""
    if not isinstance(state, dict):
        return "not a JSON object"
    if state.get("schema") != STATE_SCHEMA:
        return f"of an unknown schema {state.get('schema')!r}"
    slots = state.get("slots")
    if not isinstance(slots, dict):
        return "without a slots table"
    for slot in SLOTS:
        entry = slots.get(slot)
        if entry is None:
            continue
        try:
            info = SlotInfo(**entry)
        except TypeError:
            return f"inconsistent (slot {slot} entry malformed)"
        if not isinstance(info.bundle_id, str) or info.slot != slot:
            return f"inconsistent (slot {slot} entry malformed)"
    for key in ("active", "previous"):
        v = state.get(key)
        if v is not None and (v not in SLOTS or not slots.get(v)):
            return f"inconsistent ({key} names slot {v!r}, which holds nothing)"
    try:
        InstallState.from_dict(state)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"inconsistent (phase {state.get('phase')!r} or its candidate)"
    if not isinstance(state.get("crashes", []), list) or not all(
            isinstance(t, (int, float)) for t in state.get("crashes", [])):
        return "inconsistent (crash records)"
    failed = state.get("failed", [])
    if not isinstance(failed, list) or not all(
            isinstance(f, dict) and "deployment_id" in f and "bundle_id" in f for f in failed):
        return "inconsistent (failed deployments)"
    if not isinstance(state.get("committed_at"), (int, float, type(None))):
        return "inconsistent (commit time)"
    return None
