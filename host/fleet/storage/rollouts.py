"""The ``rollouts``, ``rollout_devices``, ``rollout_log`` and ``rollout_checks`` tables: staged
rollouts, their devices, what happened, and what their stages are compared on (thresholds, the
last comparison, the halt reason); the rollout engine resumes from these after a restart."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgepack.host.fleet.storage.db import Database, dumps, filters, loads, placeholders

__all__ = ["RolloutRecord", "RolloutDeviceRecord", "RolloutLogEntry", "RolloutChecksRecord",
           "Rollouts"]


@dataclass(frozen=True)
class RolloutRecord:
    """One staged rollout. ``stage`` counts from 0; ``stages`` are cumulative percentages."""

    id: str
    fleet: str
    group_name: str
    bundle_id: str
    bundle_name: str | None
    bundle_version: str | None
    target: str | None
    stages: tuple[float, ...]
    max_failures: str
    soak_s: float
    stage_timeout_s: float
    budgets: dict[str, float] = field(default_factory=dict)
    allow_downgrade: bool = False
    state: str = "running"
    stage: int = 0
    stage_started: float | None = None
    soak_started: float | None = None
    created: float | None = None
    updated: float | None = None
    finished: float | None = None
    detail: str | None = None
    previous_group_desired: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> RolloutRecord:
        return cls(**{**r, "stages": tuple(loads(r["stages"]) or ()),
                      "budgets": loads(r.get("budgets")) or {},
                      "previous_group_desired": loads(r.get("previous_group_desired")),
                      "allow_downgrade": bool(r.get("allow_downgrade"))})

    def to_row(self) -> dict[str, Any]:
        r = asdict(self)
        r.update(stages=dumps(list(self.stages)), budgets=dumps(self.budgets),
                 allow_downgrade=int(self.allow_downgrade),
                 previous_group_desired=dumps(self.previous_group_desired)
                 if self.previous_group_desired is not None else None)
        return r

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out


@dataclass(frozen=True)
class RolloutDeviceRecord:
    """One device of a rollout: its stage (from 0), status and the bundle it ran before
    (``previous``: bundle_id, name, version; None when it ran nothing)."""

    rollout_id: str
    device_id: str
    stage: int
    deployment_id: str | None
    status: str
    previous: dict[str, Any] | None = None
    deployed_at: float | None = None
    installed_at: float | None = None
    updated: float | None = None
    detail: str | None = None

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> RolloutDeviceRecord:
        return cls(**{**r, "previous": loads(r["previous"])})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutLogEntry:
    ts: float
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutChecksRecord:
    """A rollout's comparison thresholds (JSON of ``RolloutChecks``), its stage's last
    comparison and, once halted by one, the halt reason (JSON documents)."""

    rollout_id: str
    checks: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None
    halt: dict[str, Any] | None = None
    updated: float | None = None


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _encode(changes: dict[str, Any]) -> dict[str, Any]:
    if changes.get("previous") is not None:
        changes = {**changes, "previous": dumps(changes["previous"])}
    return changes


class Rollouts:
    """Reads and writes of the rollout tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, rollout: RolloutRecord, devices: Sequence[RolloutDeviceRecord],
               message: str, checks: dict[str, Any] | None = None) -> None:
        """Store a planned rollout with its devices, its comparison thresholds and a first log
        line, in one transaction."""
        row = rollout.to_row()
        cols = list(row)
        dcols = _columns(RolloutDeviceRecord)
        with self._db.transaction() as cur:
            cur.execute(f"INSERT INTO rollouts ({', '.join(cols)}) VALUES "
                        f"({placeholders(len(cols))})", [row[c] for c in cols])
            cur.executemany(f"INSERT INTO rollout_devices ({', '.join(dcols)}) VALUES "
                            f"({placeholders(len(dcols))})",
                            [[_encode(asdict(d))[c] for c in dcols] for d in devices])
            cur.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                        (rollout.id, time.time(), message))
            cur.execute("INSERT INTO rollout_checks (rollout_id, checks, updated) VALUES "
                        "(?, ?, ?)", (rollout.id, dumps(checks or {}), time.time()))

    def checks(self, rollout_id: str) -> RolloutChecksRecord:
        """The rollout's thresholds, last comparison and halt reason (empty for a rollout
        planned before they existed)."""
        row = self._db.query_one("SELECT * FROM rollout_checks WHERE rollout_id = ?",
                                 (rollout_id,))
        if row is None:
            return RolloutChecksRecord(rollout_id)
        return RolloutChecksRecord(rollout_id, loads(row["checks"]) or {},
                                   loads(row["comparison"]), loads(row["halt"]), row["updated"])

    def set_comparison(self, rollout_id: str, comparison: dict[str, Any],
                       halt: dict[str, Any] | None = None) -> None:
        """Store the stage's last comparison (and the halt reason it gave, if any)."""
        now = time.time()
        with self._db.transaction() as cur:
            cur.execute("UPDATE rollout_checks SET comparison = ?, updated = ?"
                        + (", halt = ?" if halt is not None else "") + " WHERE rollout_id = ?",
                        [dumps(comparison), now, *([dumps(halt)] if halt is not None else []),
                         rollout_id])
            if cur.rowcount == 0:
                cur.execute("INSERT INTO rollout_checks (rollout_id, checks, comparison, halt, "
                            "updated) VALUES (?, ?, ?, ?, ?)",
                            (rollout_id, dumps({}), dumps(comparison),
                             dumps(halt) if halt is not None else None, now))

    def update(self, rollout_id: str, *, expect_state: str | None = None,
               log: str | None = None, **changes: Any) -> bool:
        """Change a rollout's fields (only if it is in ``expect_state``) and log a message;
        False when the rollout was not in that state."""
        changes["updated"] = time.time()
        sql = f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?"
        params = [*changes.values(), rollout_id]
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)
        with self._db.transaction() as cur:
            cur.execute(sql, params)
            ok = cur.rowcount > 0
            if ok and log:
                cur.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                            (rollout_id, time.time(), log))
        return ok

    def update_devices(self, rollout_id: str, changes: dict[str, dict[str, Any]]) -> None:
        """``{device_id: {field: value}}``: change rows of ``rollout_devices``."""
        if not changes:
            return
        now = time.time()
        with self._db.transaction() as cur:
            for device_id, change in changes.items():
                values = _encode(change) | {"updated": now}
                cur.execute(f"UPDATE rollout_devices SET "
                            f"{', '.join(f'{k} = ?' for k in values)} "
                            "WHERE rollout_id = ? AND device_id = ?",
                            [*values.values(), rollout_id, device_id])

    def add_log(self, rollout_id: str, message: str) -> None:
        self._db.execute("INSERT INTO rollout_log (rollout_id, ts, message) VALUES (?, ?, ?)",
                         (rollout_id, time.time(), message))

    def get(self, rollout_id: str) -> RolloutRecord | None:
        row = self._db.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return RolloutRecord.from_row(row) if row else None

    def list(self, fleet: str | None = None, *, states: Sequence[str] | None = None,
             limit: int = 100) -> list[RolloutRecord]:
        """Rollouts, newest first, of one fleet and in some states if given."""
        where, params = filters(("fleet = ?", fleet), ("state", list(states) if states else None))
        return [RolloutRecord.from_row(r) for r in self._db.query(
            f"SELECT * FROM rollouts WHERE 1 = 1{where} ORDER BY created DESC LIMIT ?",
            [*params, int(limit)])]

    def devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        return [RolloutDeviceRecord.from_row(r) for r in self._db.query(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY stage, device_id",
            (rollout_id,))]

    def log(self, rollout_id: str, limit: int = 200) -> list[RolloutLogEntry]:
        """The newest ``limit`` log lines, oldest first."""
        return [RolloutLogEntry(**r) for r in reversed(self._db.query(
            "SELECT ts, message FROM rollout_log WHERE rollout_id = ? ORDER BY id DESC LIMIT ?",
            (rollout_id, int(limit))))]
