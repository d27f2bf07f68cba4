"""The agent's control-plane desk: trusted root rotations, capture requests, and refusals that
anyone can provoke counted instead of evented one by one.

The daemon hands it the messages of ``root/{N}`` and ``devices/{id}/capture``; desired states,
downgrades and freshness stay with the daemon's reconcile loop. Everything here runs on the
agent loop's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgepack.agent.capture import Capture
from edgepack.agent.protocol import Topics
from edgepack.agent.trust import ControlRefused, DesiredGate
from edgepack.agent.trust.root import ROOT_TOPIC, RootChain

__all__ = ["ControlDesk"]

#: at most one event per (topic, reason) in this many seconds; the rest are counted
QUIET_S = 60.0


class ControlDesk:
    """Root chain walking, capture requests and rate-limited refusal events for one agent."""

    def __init__(self, gate: DesiredGate, keys: dict, topics: Topics, capture: Capture,
                 capture_topic: str, event: Callable[..., Any]) -> None:
        self.gate = gate
        self.keys = keys  # shared with the profiler and the installer: updated in place
        self.topics = topics
        self.capture = capture
        self.capture_topic = capture_topic
        self.event = event
        v = gate.verifier  # root rotations arrive retained on root/{N} and are walked
        self.roots = RootChain(v.root, v.update_root) if v is not None else None
        self.root_prefix = topics.prefix + ROOT_TOPIC.format(version="")
        self.refused: dict[str, int] = {}  # control messages refused, by reason (telemetry)
        self.errors: dict[str, int] = {}  # messages that failed to be handled, by error
        self._refused_at: dict[tuple, tuple[float, int]] = {}  # key -> (window start, events)
        self.trust_root_keys()

    def wants_root(self, topic: str) -> bool:
        return self.roots is not None and topic.startswith(self.root_prefix)

    def on_root(self, topic: str, payload: bytes) -> None:
        """Walk the root chain (event ``root_updated`` per version); bundles are then checked
        against the new root's release keys."""
        assert self.roots is not None
        updates, refused = self.roots.offer(payload)
        for u in updates:
            self.event("root_updated", f"trusted root v{u.from_version} -> v{u.to_version} "
                       f"(changed: {', '.join(u.changed_roles) or 'expiry only'})",
                       from_version=u.from_version, to_version=u.to_version,
                       changed_roles=list(u.changed_roles), key_ids=list(u.key_ids))
        if updates:
            self.trust_root_keys()
        if refused is not None:
            self.control_refused(topic, "root", refused)

    def trust_root_keys(self) -> None:
        """Bundle and chunk-table keys: the root's release keys, plus ``trusted_keys`` until
        the first rotation (from then on the root alone says who signs)."""
        v = self.gate.verifier
        if v is None:
            return
        if v.root.version > 1:
            self.keys.clear()  # in place: the profiler holds the same dict
        self.keys.update(v.root.v1_keys("release"))

    def on_capture(self, payload: bytes, net: Any) -> None:
        try:
            req, pull = self.capture.receive(payload, self.gate)
        except ControlRefused as exc:  # capture stays as it was
            self.control_refused(self.capture_topic, "capture", exc)
            return
        if req is not None:
            self.event("capture", f"capture {req.action} (v{req.version})", action=req.action,
                       version=req.version, records=len(self.capture.ring))
        if pull is not None:
            self.capture.send(pull, net, self.topics)

    def quiet(self, key: tuple, counts: dict[str, int], name: str, burst: int = 1) -> bool:
        """Count ``name``; True when ``burst`` events for ``key`` were already written in the
        last minute, so a storm of bad messages is counted in telemetry, not one event each."""
        counts[name] = counts.get(name, 0) + 1
        now = time.monotonic()
        start, n = self._refused_at.get(key, (-QUIET_S, 0))
        if now - start >= QUIET_S:
            start, n = now, 0
        if n >= burst:
            return True
        if len(self._refused_at) > 1000:
            self._refused_at.clear()
        self._refused_at[key] = (start, n + 1)
        return False

    def control_refused(self, topic: str, kind: str, exc: ControlRefused) -> None:
        """One event per topic and reason a minute (a storm is counted in telemetry)."""
        if self.quiet((topic, exc.reason), self.refused, exc.reason):
            return
        self.event("control_refused", f"{kind} message on {topic} refused: {exc}; the device "
                   "keeps its verified desired state and its bundle", control=kind,
                   reason=exc.reason, key_ids=list(exc.key_ids),
                   version=exc.context.get("version"), topic=topic)
