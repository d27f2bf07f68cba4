"""What every device of a fleet last reported: one row per device from the retained messages.

Reads the retained ``devices/+/state`` (presence via the agent's birth message and its LWT
``{"online": false}``), ``devices/+/desired`` and ``groups/+/desired`` of one fleet and answers
which bundle each device runs, and whether that is what the host asked for. Nothing here waits for
live telemetry: ``edgepack fleet serve`` does that.
"""

from __future__ import annotations

import time
from typing import Any

from edgepack.agent.errors import ProtocolError
from edgepack.agent.mqtt import BrokerConfig, SyncClient, parse_broker_url
from edgepack.agent.protocol import Topics, decode, parse_desired
from edgepack.host.fleet.deploy import active_bundle

__all__ = ["fleet_status", "collect_retained"]


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


def fleet_status(broker: str | BrokerConfig, fleet: str = "default", *, settle: float = 0.5,
                 timeout: float = 30.0) -> list[dict[str, Any]]:
    """One dict per device that reported a state or was deployed to, sorted by device id.

    Keys: ``device``, ``status`` (``online``/``offline``/``never seen``), ``online``, ``board``,
    ``target``, ``agent_version``, ``runtimes``, ``bundle_id``, ``bundle_name``,
    ``bundle_version``, ``slot``, ``phase`` (install state machine, when reported), ``last_seen`` (the state's ``ts``), ``age_s``, ``desired``
    (the deployment that applies to it: its own, else its groups' newest, or None),
    ``in_sync`` (runs the desired bundle; None when nothing is desired) and ``error`` when the
    state message could not be read.
    """
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
         now: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device": device, "status": "never seen", "online": None, "board": None,
        "target": None, "agent_version": None, "runtimes": None, "bundle_id": None,
        "bundle_name": None, "bundle_version": None, "slot": None, "phase": None,
        "last_seen": None,
        "age_s": None, "groups": [], "desired": None, "in_sync": None,
    }
    state: dict[str, Any] = {}
    if raw is not None:
        try:
            state = decode(raw, f"state of device {device}")
        except ProtocolError as exc:
            row["error"] = str(exc)
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
        member_of = state.get("groups")
        if isinstance(member_of, list):
            row["groups"] = [g for g in member_of if isinstance(g, str)]
    applicable = own
    if applicable is None:
        candidates = [groups[g] for g in row["groups"] if g in groups]
        applicable = max(candidates, key=lambda d: d.get("ts") or 0.0, default=None)
    if applicable is not None:
        row["desired"] = applicable
        row["in_sync"] = applicable["bundle_id"] == row["bundle_id"]
    return row
