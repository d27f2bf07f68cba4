"""The ``devices`` table: one row per device — presence (retained state + LWT), what it is and
runs, its last state and its last telemetry message, and whether its reports are authentic.

``groups`` is what rollouts read. A state the collector authenticated (:class:`ReportTrust`
with a key id) sets it to the groups the inventory gives the device; an unauthenticated one
sets it to none; what the device itself claims is kept in ``claimed_groups`` for display."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgepack.host.fleet.storage.db import Cursor, Database, dumps, loads, num, text

__all__ = ["DeviceRecord", "Devices", "ReportTrust", "UNAUTHENTICATED"]

_COLUMNS = ("fleet", "device_id", "online", "online_changed", "offline_reason", "board",
            "target", "agent_version", "groups_json", "bundle_id", "bundle_name",
            "bundle_version", "slot", "phase", "state", "state_ts", "first_seen", "last_seen",
            "key_id", "claimed_groups")


@dataclass(frozen=True)
class DeviceRecord:
    """What the collector knows of one device. ``telemetry`` is the last telemetry message as
    stored columns (``p95``, ``rss_mb``, …, only those reported, plus ``ts`` and ``received``)."""

    fleet: str
    device_id: str
    online: bool | None = None
    online_changed: float | None = None
    offline_reason: str | None = None
    board: str | None = None
    target: str | None = None
    agent_version: str | None = None
    groups: tuple[str, ...] = ()
    bundle_id: str | None = None
    bundle_name: str | None = None
    bundle_version: str | None = None
    slot: str | None = None
    phase: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    state_ts: float | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    telemetry: dict[str, Any] | None = None
    telemetry_ts: float | None = None
    key_id: str | None = None  # the enrolled key its last state was signed with
    claimed_groups: tuple[str, ...] = ()  # what the device says (shown, never trusted)
    unauthenticated: int = 0  # reports refused: unsigned, forged, not enrolled
    auth_error: str | None = None  # why the last one was refused

    @property
    def authenticated(self) -> bool:
        """Whether the collector verified this device's state against its enrolled key."""
        return self.key_id is not None

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> DeviceRecord:
        r = dict(r)
        groups = loads(r.pop("groups_json", None)) or []
        return cls(**{**r, "groups": tuple(groups), "state": loads(r.get("state")) or {},
                      "telemetry": loads(r.get("telemetry")),
                      "claimed_groups": tuple(loads(r.get("claimed_groups")) or ()),
                      "unauthenticated": int(r.get("unauthenticated") or 0),
                      "online": None if r.get("online") is None else bool(r["online"])})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(groups=list(self.groups), claimed_groups=list(self.claimed_groups),
                   authenticated=self.authenticated)
        return out


@dataclass(frozen=True)
class ReportTrust:
    """What the collector established about a state message: the enrolled key that signed it
    (None: unauthenticated) and the groups the inventory puts the device in."""

    key_id: str | None
    groups: tuple[str, ...] = ()


UNAUTHENTICATED = ReportTrust(None)


def _active(state: dict) -> dict:
    a = state.get("active")
    if isinstance(a, str):
        return {"bundle_id": a}
    return a if isinstance(a, dict) else {}


def _is_full_state(state: dict) -> bool:
    """A birth/agent state message (as opposed to the presence-only LWT)."""
    return any(k in state for k in ("target", "board", "active", "agent_version"))


class Devices:
    """Reads and writes of the ``devices`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- reads
    def list(self, fleet: str, *, ids: Iterable[str] | None = None) -> list[DeviceRecord]:
        """Every device of ``fleet`` (or those in ``ids``), by device id."""
        rows = self._db.query("SELECT * FROM devices WHERE fleet = ? ORDER BY device_id",
                              (fleet,))
        if ids is not None:
            wanted = set(ids)
            rows = [r for r in rows if r["device_id"] in wanted]
        return [DeviceRecord.from_row(r) for r in rows]

    def get(self, fleet: str, device_id: str) -> DeviceRecord | None:
        row = self._db.query_one("SELECT * FROM devices WHERE fleet = ? AND device_id = ?",
                                 (fleet, device_id))
        return DeviceRecord.from_row(row) if row else None

    # -- writes, inside the collector's batch transaction
    def write_state(self, cur: Cursor, fleet: str, device: str, received: float,
                    state: dict, trust: ReportTrust | None = None) -> None:
        """Store a state message; a presence-only one (the LWT) keeps the rest of the row.

        With ``trust`` (the collector's verdict) the row's groups are the inventory's (none
        when unauthenticated); without it (tools writing the store directly) the state's."""
        d = cur.dialect
        online = state.get("online")
        online_i = int(online) if isinstance(online, bool) else None
        changed = (f"online_changed = CASE WHEN {d.same('devices.online', 'excluded.online')} "
                   "THEN COALESCE(devices.online_changed, excluded.online_changed) "
                   "ELSE excluded.online_changed END")
        reason = None if online else text(state.get("reason")) or ("clean shutdown" if
                                                                   online is False else None)
        ts = num(state.get("ts"))
        last_seen = f"last_seen = {d.greatest}(COALESCE(devices.last_seen, 0), excluded.last_seen)"
        if not _is_full_state(state):
            cur.execute(
                "INSERT INTO devices (fleet, device_id, online, online_changed, offline_reason, "
                "first_seen, last_seen, state_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (fleet, device_id) DO UPDATE SET online = excluded.online, "
                f"{changed}, offline_reason = excluded.offline_reason, {last_seen}",
                (fleet, device, online_i, received, reason, received, received, ts))
            return
        active = _active(state)
        groups = state.get("groups")
        groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else None
        claimed = dumps(groups) if groups is not None else None
        if trust is not None:
            groups = list(trust.groups) if trust.key_id is not None else []
        slot = state.get("slot", active.get("slot"))
        row = (fleet, device, online_i, received, reason, text(state.get("board")),
               text(state.get("target")), text(state.get("agent_version")),
               dumps(groups) if groups is not None else None,
               text(active.get("bundle_id", active.get("id")), 64), text(active.get("name")),
               text(active.get("version")), text(slot) if slot is not None else None,
               text(state.get("phase")), dumps(state), ts, received, received,
               trust.key_id if trust is not None else None, claimed)
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*_COLUMNS[5:16], *_COLUMNS[18:]))
        cur.execute(
            f"INSERT INTO devices ({', '.join(_COLUMNS)}) VALUES "
            f"({', '.join('?' * len(_COLUMNS))}) "
            "ON CONFLICT (fleet, device_id) DO UPDATE SET online = excluded.online, "
            f"{changed}, offline_reason = excluded.offline_reason, {updates}, {last_seen}",
            row)

    def write_last_telemetry(self, cur: Cursor,
                             rows: Sequence[tuple[str, str, float, float, str, float]]) -> None:
        """``(fleet, device, received, received, summary json, ts)`` per device: the newest
        telemetry message, unless an even newer one is stored already."""
        d = cur.dialect
        dcols = "fleet, device_id, first_seen, last_seen, telemetry, telemetry_ts"
        update = (
            " ON CONFLICT (fleet, device_id) DO "
            "UPDATE SET telemetry = CASE WHEN devices.telemetry_ts IS NULL OR "
            "excluded.telemetry_ts >= devices.telemetry_ts THEN excluded.telemetry ELSE "
            "devices.telemetry END, telemetry_ts = "
            f"{d.greatest}(COALESCE(devices.telemetry_ts, 0), excluded.telemetry_ts), "
            f"last_seen = {d.greatest}(COALESCE(devices.last_seen, 0), excluded.last_seen)")
        if cur.kind == "postgresql" and len(rows) > 20:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS devices_in (fleet TEXT, "
                        "device_id TEXT, first_seen DOUBLE PRECISION, last_seen DOUBLE "
                        "PRECISION, telemetry TEXT, telemetry_ts DOUBLE PRECISION) "
                        "ON COMMIT DELETE ROWS")
            cur.copy_rows(f"COPY devices_in ({dcols}) FROM STDIN", rows)
            cur.execute(f"INSERT INTO devices ({dcols}) SELECT {dcols} FROM devices_in" + update)
        else:
            cur.values_many(f"INSERT INTO devices ({dcols}) VALUES ", rows, update)

    def count_refused(self, cur: Cursor, refused: Sequence[tuple[str, str, float, str]]) -> None:
        """Add ``(fleet, device, received, reason)`` refused reports to the ``unauthenticated``
        counter of devices the table has (an unknown id creates no row)."""
        cur.executemany(
            "UPDATE devices SET unauthenticated = COALESCE(unauthenticated, 0) + 1, "
            "auth_error = ? WHERE fleet = ? AND device_id = ?",
            [(reason, f, dev) for f, dev, _, reason in refused])

    def set_trust(self, fleet: str, device: str, trust: ReportTrust) -> None:
        """Set a device's key id and trusted groups (enrollment, re-enrollment, revocation)."""
        self._db.execute("UPDATE devices SET key_id = ?, groups_json = ? WHERE fleet = ? AND "
                         "device_id = ?", (trust.key_id, dumps(list(trust.groups)
                                                                if trust.key_id else []),
                                           fleet, device))

    def touch(self, cur: Cursor, seen: dict[tuple[str, str], float]) -> None:
        """Move ``last_seen`` forward for ``{(fleet, device): received}``."""
        cur.executemany(
            f"UPDATE devices SET last_seen = {cur.dialect.greatest}(COALESCE(last_seen, 0), ?) "
            "WHERE fleet = ? AND device_id = ?",
            [(rcv, f, dev) for (f, dev), rcv in seen.items()])
