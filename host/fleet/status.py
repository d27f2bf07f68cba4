"""What every device of a fleet last reported: one row per device from the retained messages.

Reads the retained ``devices/+/state`` (presence via the agent's birth message and its LWT
``{"online": false}``), ``devices/+/desired`` and ``groups/+/desired`` of one fleet and answers
which bundle each device runs, and whether that is what the host asked for. Nothing here waits for
live telemetry: ``edgepack fleet serve`` does that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from edgepack.agent.errors import ProtocolError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import Topics, decode, parse_desired
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.deploy import active_bundle

__all__ = ["fleet_status", "DeviceStatus", "collect_retained"]


@dataclass(frozen=True)
class DeviceStatus:
    """One device of a fleet as its retained messages describe it.

    ``status`` is ``online``, ``offline``, ``unknown`` or ``never seen`` (deployed to, never
    reported); ``last_seen`` is the state's ``ts``; ``desired`` the deployment that applies to
    it (its own, else its groups' newest, or None); ``in_sync`` whether it runs the desired
    bundle (None when nothing is desired); ``error`` when the state message could not be read.
    """

    device: str
    status: str = "never seen"
    online: bool | None = None
    board: str | None = None
    target: str | None = None
    agent_version: str | None = None
    runtimes: Any = None
    bundle_id: str | None = None
    bundle_name: str | None = None
    bundle_version: str | None = None
    slot: str | None = None
    phase: str | None = None
    last_seen: float | None = None
    age_s: float | None = None
    groups: tuple[str, ...] = ()
    desired: dict[str, Any] | None = None
    in_sync: bool | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        if self.error is None:
            del out["error"]
        return out


def collect_retained(client: SyncClient, filters: list[str], *, settle: float = 0.5,
                     timeout: float = 30.0) -> dict[str, bytes]:
    """Every retained message under ``filters``, newest payload per topic.

    Done when no retained message arrived for ``settle`` seconds. Live (non-retained) updates
    that arrive meanwhile are newer and kept, but do not extend the wait, so a busy fleet
    cannot keep this from returning. Empty payloads (cleared topics) are dropped.
    """
    for f in filters:
        client.subscribe(f)
    out: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    quiet_until = time.monotonic() + settle
    while (now := time.monotonic()) < min(deadline, quiet_until):
        msg = client.get(min(deadline, quiet_until) - now)
        if msg is None:
            break
        topic, payload, retained = msg
        if retained:
            quiet_until = time.monotonic() + settle
        if payload:
            out[topic] = payload
        else:
            out.pop(topic, None)
    for f in filters:
        client.unsubscribe(f)
    return out


def fleet_status(*, broker: str | BrokerConfig, fleet: str = "default", settle: float = 0.5,
                 timeout: float = 30.0) -> list[DeviceStatus]:
    """Every device that reported a state or was deployed to, sorted by device id, from the
    broker's retained messages (``settle``: seconds without a new one before answering)."""
    topics = Topics(fleet)
    cfg = parse_broker_url(broker) if isinstance(broker, str) else broker
    with SyncClient(cfg, timeout=timeout) as client:
        found = collect_retained(client, [topics.all_devices("state"),
                                          topics.all_devices("desired"),
                                          topics.prefix + "groups/+/desired"],
                                 settle=settle, timeout=timeout)
    states: dict[str, bytes] = {}
    desired: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for topic, payload in found.items():
        rel = topic[len(topics.prefix):].split("/")
        if rel[0] == "groups" and len(rel) == 3:
            if (d := _desired(payload)) is not None:
                groups[rel[1]] = d
            continue
        try:
            device, leaf = topics.parse_device_topic(topic)
        except ProtocolError:
            continue  # someone published under an id no agent can have: not a device
        if leaf == "state":
            states[device] = payload
        elif leaf == "desired" and (d := _desired(payload)) is not None:
            desired[device] = d
    now = time.time()
    return [_row(dev, states.get(dev), desired.get(dev), groups, now)
            for dev in sorted(set(states) | set(desired))]


def _desired(payload: bytes) -> dict | None:
    try:
        d = parse_desired(payload)
    except ProtocolError:
        return None
    return None if d is None else d.to_payload()


def _row(device: str, raw: bytes | None, own: dict | None, groups: dict[str, dict],
         now: float) -> DeviceStatus:
    row: dict[str, Any] = {"device": device}
    state: dict[str, Any] = {}
    if raw is not None:
        try:
            state = decode(raw, f"state of device {device}")
        except ProtocolError as exc:
            row["error"] = str(exc)
    member_of: list[str] = []
    if state or raw is not None:
        online = state.get("online")
        row["online"] = online if isinstance(online, bool) else None
        row["status"] = "online" if online is True else "offline" if online is False \
            else "unknown"
        active = active_bundle(state)
        row.update(board=state.get("board"), target=state.get("target"),
                   agent_version=state.get("agent_version", state.get("version")),
                   runtimes=state.get("runtimes"), bundle_id=active.get("bundle_id"),
                   bundle_name=active.get("name"), bundle_version=active.get("version"),
                   slot=active.get("slot", state.get("slot")), phase=state.get("phase"))
        ts = state.get("ts")
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            row["last_seen"] = float(ts)
            row["age_s"] = max(0.0, now - float(ts))
        if isinstance(state.get("groups"), list):
            member_of = [g for g in state["groups"] if isinstance(g, str)]
    applicable = own
    if applicable is None:
        candidates = [groups[g] for g in member_of if g in groups]
        applicable = max(candidates, key=lambda d: d.get("ts") or 0.0, default=None)
    if applicable is not None:
        row["desired"] = applicable
        row["in_sync"] = applicable["bundle_id"] == row.get("bundle_id")
    return DeviceStatus(**row, groups=tuple(member_of))
