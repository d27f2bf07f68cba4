"""What a device remembers between restarts to refuse replays and rollbacks (one 0600 file).

* ``versions``: per message key (``kind/scope/subject``, e.g. ``desired/group/cams``) the highest
  version accepted, the sha256 of its signed bytes (so a redelivery of the same message is
  recognised as the same, and a different message under the same version is refused), the role
  and key ids that signed it, and its expiry.
* ``floors``: per model name the lowest bundle version the device may install (the highest it
  ever installed, unless a release-signed downgrade authorization lowered it).
* ``freshness``: the newest verified freshness message (when it was issued, its version and the
  message versions it vouches for).

The counter is per message key, not per signing role: were it per role, a replay of an older
message signed by the *other* role allowed for the same key would pass (TUF keeps one version
per metadata file for the same reason).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.trust.errors import Reason, TrustError
from edgepack.agent.trust.privatefile import write_private

__all__ = ["Seen", "FreshnessRecord", "Ledger"]


@dataclass(frozen=True)
class Seen:
    """The highest accepted version of one message key."""

    version: int
    digest: str
    role: str
    key_ids: tuple[str, ...]
    expires: int


@dataclass(frozen=True)
class FreshnessRecord:
    """The newest verified freshness message."""

    version: int
    issued: int
    expires: int
    key_ids: tuple[str, ...]
    versions: Mapping[str, int]


class Ledger:
    """Versions, floors and freshness of one device, stored in ``path`` (JSON, 0600)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.versions: dict[str, Seen] = {}
        self.floors: dict[str, str] = {}
        self.freshness: FreshnessRecord | None = None
        self._read()

    def _read(self) -> None:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # A damaged ledger must not open the door to replays: keep the file for the
            # operator and refuse to start with an empty memory.
            raise TrustError(f"the trust ledger {self.path} is unreadable ({exc}); restore it "
                             "from a backup, or delete it knowingly (replays of messages older "
                             "than the newest ones become possible until new ones arrive)",
                             reason=Reason.MALFORMED, path=self.path) from None
        for key, s in doc.get("versions", {}).items():
            self.versions[key] = Seen(int(s["version"]), str(s["digest"]), str(s["role"]),
                                      tuple(s["key_ids"]), int(s["expires"]))
        self.floors = {str(k): str(v) for k, v in doc.get("floors", {}).items()}
        f = doc.get("freshness")
        if f:
            self.freshness = FreshnessRecord(int(f["version"]), int(f["issued"]),
                                             int(f["expires"]), tuple(f["key_ids"]),
                                             {str(k): int(v) for k, v in f["versions"].items()})

    def save(self) -> None:
        """Persist atomically (temporary file, fsync, rename) with mode 0600."""
        doc: dict[str, Any] = {
            "versions": {k: {**asdict(s), "key_ids": list(s.key_ids)}
                         for k, s in sorted(self.versions.items())},
            "floors": dict(sorted(self.floors.items())),
            "freshness": None if self.freshness is None else {
                **asdict(self.freshness), "key_ids": list(self.freshness.key_ids),
                "versions": dict(self.freshness.versions)},
        }
        write_private(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def seen(self, key: str) -> Seen | None:
        """The highest accepted version of ``key``, if any."""
        return self.versions.get(key)

    def record(self, key: str, seen: Seen) -> None:
        """Remember ``seen`` as the highest version of ``key`` and persist."""
        self.versions[key] = seen
        self.save()

    def record_freshness(self, rec: FreshnessRecord) -> None:
        """Remember the newest freshness message and persist."""
        self.freshness = rec
        self.save()

    def set_floor(self, name: str, version: str) -> None:
        """Set the rollback floor of model ``name`` and persist."""
        self.floors[name] = version
        self.save()

    def forget_signed_by(self, role: str, removed: Iterable[str]) -> tuple[str, ...]:
        """Forget versions signed only by ``removed`` keys of ``role`` (fast-forward recovery).

        After the root rotates a compromised key out, messages it signed with absurd versions
        must not block the genuine ones for ever. Messages those keys signed no longer verify,
        so forgetting their versions opens no replay. Returns the keys forgotten.
        """
        removed = set(removed)
        gone = tuple(k for k, s in self.versions.items()
                     if s.role == role and s.key_ids and set(s.key_ids) <= removed)
        for k in gone:
            del self.versions[k]
        if role == "online" and self.freshness and set(self.freshness.key_ids) <= removed:
            self.freshness = None
        if gone or role == "online":
            self.save()
        return gone
