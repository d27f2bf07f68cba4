"""From what the broker delivered to a :class:`Batch`: topic routing and payload decoding.

Garbage (a foreign topic, an invalid device id, a payload that is not JSON) is counted and
skipped; the rest of the batch is kept.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from edgepack.agent.errors import ProtocolError
from edgepack.agent.identity import SIG_FIELD
from edgepack.agent.protocol import VERSION, check_id, decode, parse_desired
from edgepack.host.fleet.collector.authenticator import Authenticator
from edgepack.host.fleet.drift import decode_window
from edgepack.host.fleet.storage import UNAUTHENTICATED, Batch

__all__ = ["Parsed", "parse_messages"]

log = logging.getLogger("edgepack.collector")

# (received, topic, payload, retained)
Message = tuple[float, str, bytes, bool]


class Parsed:
    """A batch and the device / receive timestamps of its telemetry and events (for lag)."""

    __slots__ = ("batch", "device_ts", "received_ts")

    def __init__(self) -> None:
        self.batch = Batch()
        self.device_ts: list[float] = []
        self.received_ts: list[float] = []


def parse_messages(items: Iterable[Message], fleets: set[str], *, received: Counter,
                   dropped: Counter, on_bundle: Callable[[str, dict], None],
                   auth: Authenticator | None = None,
                   refused: Counter | None = None) -> Parsed:
    """Decode messages into a batch, counting them by kind in ``received`` and the garbage in
    ``dropped["bad_message"]``; ``on_bundle(fleet, table)`` hears of every manifest message.

    With ``auth``, device reports are authenticated: an unauthenticated one is counted in
    ``dropped["unauthenticated"]``, in ``refused`` by reason and on its device's row; it is
    never stored as a report — except the state of a device that is not enrolled, stored with
    no groups so the dashboard shows it (a v1 device, say) as unauthenticated."""
    out = Parsed()
    batch = out.batch
    base = f"edgepack/{VERSION}/"
    for rcv, topic, payload, retained in items:
        try:
            if not topic.startswith(base):
                raise ProtocolError("foreign topic")
            parts = topic[len(base):].split("/")
            fleet = parts[0]
            if fleet not in fleets or len(parts) != 4:
                raise ProtocolError("foreign topic")
            kind, name, leaf = parts[1:]
            if kind == "devices":
                device = check_id(name)
                received[leaf] += 1
                if leaf == "desired":
                    batch.desired.append((fleet, "device", device, rcv,
                                          _desired(payload)))
                    continue
                if not payload or leaf not in ("telemetry", "events", "state"):
                    continue  # a cleared state: nothing to record
                body = decode(bytes(payload), f"{leaf} of {device}")
                trust = auth.check(fleet, device, body) if auth is not None else None
                if isinstance(trust, str):
                    dropped["unauthenticated"] += 1
                    if refused is not None:
                        refused[trust] += 1
                    batch.refused.append((fleet, device, rcv, trust))
                    if leaf != "state" or auth.enrolled(fleet, device):
                        continue
                    trust = UNAUTHENTICATED
                if leaf == "state":
                    seen = rcv
                    ts = body.get("ts")
                    if retained and type(ts) in (int, float) and 0 < ts < rcv:
                        seen = float(ts)  # a retained state is as old as it says, not new
                    batch.states.append((fleet, device, seen, body) if trust is None
                                        else (fleet, device, seen, body, trust))
                    continue
                body.pop(SIG_FIELD, None)
                (batch.telemetry if leaf == "telemetry" else batch.events).append(
                    (fleet, device, rcv, body))
                if leaf == "telemetry" and body.get("drift") is not None:
                    _drift_window(batch, fleet, device, rcv, body, dropped)
                ts = body.get("ts")
                if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                    out.device_ts.append(float(ts))
                out.received_ts.append(rcv)
            elif kind == "groups" and leaf == "desired":
                received["group_desired"] += 1
                batch.desired.append((fleet, "group", check_id(name, "group name"), rcv,
                                      _desired(payload)))
            elif kind == "bundles" and leaf == "manifest":
                received["manifest"] += 1
                if payload:
                    table = decode(bytes(payload), "bundle manifest message")
                    if table.get("bundle_id") == name:
                        batch.bundles.append((fleet, rcv, table))
                        on_bundle(fleet, table)
            else:
                raise ProtocolError("unexpected topic")
        except ProtocolError as exc:
            dropped["bad_message"] += 1
            log.debug("dropped a message on %s: %s", topic, exc)
    return out


def _drift_window(batch: Batch, fleet: str, device: str, received: float, telemetry: dict,
                  dropped: Counter) -> None:
    """Keep a telemetry message's drift window if it is a well-formed ``drift/1`` window; a bad
    one is counted in ``dropped["bad_drift"]`` and the rest of the message is kept."""
    raw = telemetry["drift"]
    try:
        w = decode_window(raw)
    except ProtocolError as exc:
        dropped["bad_drift"] += 1
        log.debug("dropped the drift window of %s: %s", device, exc)
        return
    batch.drift.append((fleet, device, received, telemetry, w.reference_id,
                        (w.calls, w.sampled, w.rows),
                        raw if isinstance(raw, str) else json.dumps(raw, separators=(",", ":"))))

def _desired(payload: bytes) -> dict | None:
    """A desired state (protocol v1, or v2 signed metadata read without verifying) as the v1
    dict the store keeps; None when cleared."""
    if not payload:
        return None
    body = decode(bytes(payload), "desired state")
    if "signed" not in body:
        return body
    ds = parse_desired(bytes(payload))
    return ds.to_payload() if ds is not None else None
