"""Which device reports the collector believes: those its enrolled key signed.

The inventory (``store.inventory``) is read once and again whenever an enrollment or a
revocation changes it (checked once per batch). A report — state, event, telemetry — is
authentic when :class:`~edgepack.host.fleet.identity.ReportVerifier` accepts it for the device
its topic names; anything else is refused with the verifier's reason (``unsigned``,
``not_enrolled``, ``unknown_key``, ``bad_signature``, ``wrong_device``, ``malformed``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from edgepack.agent.trust.errors import ReportRefused
from edgepack.host.fleet.identity import ReportVerifier, public_key_from_enrollment
from edgepack.host.fleet.storage import ReportTrust, Store

__all__ = ["Authenticator"]

log = logging.getLogger("edgepack.collector")


class Authenticator:
    """Verify device reports against the fleet's inventory (used by the writer thread only)."""

    def __init__(self, store: Store, fleets: Sequence[str]) -> None:
        self.store = store
        self.fleets = tuple(fleets)
        self._version: tuple[int, float] | None = None
        self._groups: dict[tuple[str, str], tuple[str, ...]] = {}
        self._verifiers: dict[str, ReportVerifier] = {}

    def refresh(self) -> None:
        """Reload the inventory if an enrollment or revocation changed it."""
        version = self.store.inventory.version()
        if version == self._version:
            return
        active = self.store.inventory.active(self.fleets)
        verifiers: dict[str, ReportVerifier] = {}
        for fleet in self.fleets:
            keys: dict[str, Any] = {}
            for (f, dev), rec in active.items():
                if f != fleet:
                    continue
                try:
                    keys[dev] = public_key_from_enrollment(rec.enrollment())
                except ReportRefused as exc:  # a damaged row: that device is not believed
                    log.warning("enrollment of %s in fleet %s is unusable: %s", dev, fleet, exc)
            verifiers[fleet] = ReportVerifier(keys)
        self._verifiers = verifiers
        self._groups = {k: rec.groups for k, rec in active.items()}
        self._version = version

    @property
    def loaded(self) -> bool:
        """Whether the inventory was read at least once."""
        return self._version is not None

    def enrolled(self, fleet: str, device: str) -> bool:
        return (fleet, device) in self._groups

    def check(self, fleet: str, device: str, report: dict) -> ReportTrust | str:
        """The :class:`ReportTrust` of an authentic report, or why it is refused."""
        verifier = self._verifiers.get(fleet)
        if verifier is None:
            return "not_enrolled"
        try:
            ok = verifier.verify(report, topic_device=device)
        except ReportRefused as exc:
            return str(exc.reason)
        return ReportTrust(ok.key_id, self._groups.get((fleet, device), ()))
