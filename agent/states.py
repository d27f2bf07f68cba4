"""The install state machine: its states, the transitions between them, and where a restarted
agent resumes. Pure logic: no I/O (the installer persists it, the deployment drives it).

::

                 new desired state (≠ active bundle, deployment not failed before)
    idle ─────────────────────────────────────► downloading ──► verifying ──► staged
     ▲                                 retry ▲      │ error         │              │
     │                                       └── waiting            │ rejected     ▼
     │                                                              ▼        health_checking
     ├──────── committed (new slot active) ◄──────── passed ───────────────────┤
     ├──────── rolled_back (old slot stays) ◄─────── failed ───────────────────┘
     ├──────── rejected / failed (old slot stays)
     └──────── cancelled: a newer desired state, or it was cleared (from any working state)

``committed``, ``rolled_back``, ``rejected`` and ``failed`` are *outcomes*: entering one
returns the machine to ``idle`` in the same atomic write of ``state.json`` (the commit is that
very rename), and the outcome is kept as ``last``. Every other transition is one write too, so
``state.json`` always names the state the agent was in; :data:`RESUME` says what a restarted
agent does for each of them. ``docs/agent-state-machine.md`` draws it all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from edgepack.agent.errors import InstallError

__all__ = ["Phase", "WORKING", "OUTCOMES", "TRANSITIONS", "Candidate", "Outcome",
           "InstallState", "Resume", "RESUME", "resume"]


class Phase(str, Enum):
    """A state of the install machine; the value is the wire name (``phase`` in messages)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    WAITING = "waiting"  # a download failed; retried after a backoff
    VERIFYING = "verifying"
    STAGED = "staged"
    HEALTH_CHECKING = "health_checking"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: states in which a deployment is being worked on
WORKING = frozenset({Phase.DOWNLOADING, Phase.WAITING, Phase.VERIFYING, Phase.STAGED,
                     Phase.HEALTH_CHECKING})
#: final states of one deployment: entered and left (to idle) in one write
OUTCOMES = frozenset({Phase.COMMITTED, Phase.ROLLED_BACK, Phase.REJECTED, Phase.FAILED})

#: every allowed transition; any working state may also go back to idle (cancelled)
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.DOWNLOADING}),
    Phase.DOWNLOADING: frozenset({Phase.VERIFYING, Phase.WAITING, Phase.REJECTED,
                                  Phase.FAILED, Phase.IDLE}),
    Phase.WAITING: frozenset({Phase.DOWNLOADING, Phase.IDLE}),
    Phase.VERIFYING: frozenset({Phase.STAGED, Phase.REJECTED, Phase.FAILED, Phase.IDLE}),
    Phase.STAGED: frozenset({Phase.HEALTH_CHECKING, Phase.FAILED, Phase.IDLE}),
    Phase.HEALTH_CHECKING: frozenset({Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED,
                                      Phase.IDLE}),
    **{o: frozenset({Phase.IDLE}) for o in OUTCOMES},
}


@dataclass(frozen=True)
class Candidate:
    """The bundle being installed (persisted as ``candidate`` in ``state.json``)."""

    bundle_id: str
    deployment_id: str
    name: str = ""
    version: str = ""
    slot: str | None = None  # the inactive slot it is unpacked into (from verifying on)
    attempts: int = 0  # failed downloads so far

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(bundle_id=str(d["bundle_id"]), deployment_id=str(d.get("deployment_id", "")),
                   name=str(d.get("name", "")), version=str(d.get("version", "")),
                   slot=d.get("slot"), attempts=int(d.get("attempts", 0)))


@dataclass(frozen=True)
class Outcome:
    """How the last deployment ended (persisted as ``last``)."""

    phase: Phase
    deployment_id: str
    bundle_id: str
    reason: str = ""
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phase": self.phase.value}


@dataclass(frozen=True)
class InstallState:
    """Where the install machine is: ``phase``, the ``candidate`` worked on, the ``last``
    outcome. Immutable: :meth:`to` returns the next state and refuses illegal transitions."""

    phase: Phase = Phase.IDLE
    candidate: Candidate | None = None
    last: Outcome | None = None

    @property
    def busy(self) -> bool:
        return self.phase in WORKING

    def to(self, phase: Phase, *, candidate: Candidate | None = None, reason: str = "",
           now: float = 0.0) -> InstallState:
        """The state after the transition to ``phase``. An outcome lands in idle at once,
        recorded as ``last``; ``candidate`` replaces the current one (kept if None)."""
        if phase not in TRANSITIONS[self.phase]:
            raise InstallError(f"install state machine: no transition from {self.phase} to "
                               f"{phase}", phase=str(self.phase))
        cand = candidate or self.candidate
        if phase in OUTCOMES:
            last = Outcome(phase, cand.deployment_id, cand.bundle_id, reason, now) if cand \
                else self.last
            return InstallState(Phase.IDLE, None, last)
        if phase == Phase.IDLE:
            return InstallState(Phase.IDLE, None, self.last)
        if cand is None:
            raise InstallError(f"install state machine: {phase} needs a candidate bundle")
        return replace(self, phase=phase, candidate=cand)

    def to_dict(self) -> dict[str, Any]:
        """The fields kept in ``state.json``."""
        return {"phase": self.phase.value,
                "candidate": self.candidate.to_dict() if self.candidate else None,
                "last": self.last.to_dict() if self.last else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstallState:
        """Read the fields of ``state.json``; ValueError/KeyError/TypeError when malformed."""
        phase = Phase(d.get("phase", "idle"))
        if phase in OUTCOMES:
            raise ValueError(f"phase {phase} is never stored")
        cand = d.get("candidate")
        last = d.get("last")
        return cls(phase, Candidate.from_dict(cand) if cand else None,
                   Outcome(Phase(last["phase"]), str(last["deployment_id"]),
                           str(last["bundle_id"]), str(last.get("reason", "")),
                           float(last.get("ts", 0.0))) if last else None)


class Resume(str, Enum):
    """What a restarted agent does about the state it finds in ``state.json``."""

    NOTHING = "nothing"  # idle: serve the active bundle, follow the desired state
    DOWNLOAD = "download"  # fetch again, keeping the chunks the bitmap records as on disk
    REINSTALL = "reinstall"  # verify the complete download again, re-stage, re-check


#: phase found at start → what happens. In every case the machine restarts from idle with the
#: old bundle active (the candidate was never committed), and the desired state, still retained
#: on the broker, starts the deployment again from the step the files on disk allow.
RESUME: dict[Phase, Resume] = {
    Phase.IDLE: Resume.NOTHING,
    Phase.DOWNLOADING: Resume.DOWNLOAD,
    Phase.WAITING: Resume.DOWNLOAD,  # retried at once: the restart was the backoff
    Phase.VERIFYING: Resume.REINSTALL,
    Phase.STAGED: Resume.REINSTALL,
    Phase.HEALTH_CHECKING: Resume.REINSTALL,  # the health child died with the agent
}


def resume(state: InstallState) -> tuple[InstallState, Resume]:
    """The state a restarted agent starts from, and what it will redo."""
    rule = RESUME[state.phase]
    return InstallState(Phase.IDLE, None, state.last), rule
