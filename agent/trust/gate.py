"""The agent's door for control messages: desired states and downgrade authorizations are
verified here before the agent acts on them, and bundles pass the rollback floor here.

:class:`DesiredGate` wraps :class:`ControlVerifier` for one device:

* **where trust comes from** (:func:`open_root`): the trusted root persisted in
  ``{data_dir}/trust/root.json`` (rotations land there); else the fleet's ``root.json`` named
  by ``trust_root`` in agent.toml, installed at first start; else, the simple path, a root
  *derived* from the ``trusted_keys`` the device already trusts for bundles: those keys hold
  every role with a threshold of one (what ``edgepack keys generate`` gives a one-machine
  trial). A derived root is as trustworthy as the configuration that names the keys;
* **desired states** (:meth:`DesiredGate.desired`): a v2 signed message, verified
  (signature, addressee, expiry, version above the highest seen) — or, only with
  ``allow_unsigned`` (development), a v1 unsigned one. Any refusal raises
  :class:`ControlRefused` and the caller keeps its previous desired state;
* **downgrades and the floor** (:meth:`downgrade`, :meth:`check_floor`,
  :meth:`record_install`);
* **profile jobs and capture requests** (:meth:`job`, :meth:`capture`): verified like the
  rest; the ledger's version per device makes a replayed or redelivered one recognisable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgepack.agent.protocol import DesiredState, desired_from_control, parse_desired
from edgepack.agent.trust.errors import ControlRefused, Reason
from edgepack.agent.trust.privatefile import write_private
from edgepack.agent.trust.root import TrustedRoot
from edgepack.agent.trust.verifier import (
    ControlVerifier,
    FloorDecision,
    FreshnessStatus,
    Verified,
)

__all__ = ["DesiredGate", "derive_root", "open_root"]

log = logging.getLogger("edgepack.agent")

DERIVED_EXPIRES = "2100-01-01T00:00:00Z"  # a derived root rotates with agent.toml, not by date


def _tuf_keys(pem_paths: Iterable[str]) -> list[Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from securesystemslib.signer import SSlibKey

    keys = []
    for p in pem_paths:
        pub = serialization.load_pem_public_key(Path(p).read_bytes())
        if isinstance(pub, Ed25519PublicKey):
            keys.append(SSlibKey.from_crypto(pub))
    return keys


def derive_root(pem_paths: Iterable[str]) -> bytes:
    """Root metadata v1 in which the Ed25519 keys in ``pem_paths`` hold every role (threshold
    1), unsigned: the device trusts it because its own configuration names the keys."""
    from datetime import datetime, timezone

    from tuf.api.metadata import Metadata, Root

    keys = _tuf_keys(pem_paths)
    if not keys:
        raise ControlRefused("no Ed25519 key among trusted_keys to derive a trusted root from",
                             reason=Reason.KEY_FILE)
    root = Root(expires=datetime.strptime(DERIVED_EXPIRES, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc), consistent_snapshot=False)
    for role in ("root", "targets", "snapshot", "timestamp"):
        for k in keys:
            root.add_key(k, role)
    return Metadata(root).to_bytes()


def _is_derived(data: bytes) -> bool:
    try:
        doc = json.loads(data)
        return not doc["signatures"] and doc["signed"]["version"] == 1
    except (ValueError, KeyError, TypeError):
        return False


def open_root(trust_dir: Path, *, root_file: str = "", trusted_keys: Iterable[str] = ()
              ) -> bool:
    """Make sure ``trust_dir/root.json`` holds the root to trust; False when there is none
    (a development device with ``allow_unsigned`` and no keys)."""
    path = trust_dir / "root.json"
    keys = tuple(trusted_keys)
    if path.exists():
        current = path.read_bytes()
        if not _is_derived(current) or not (keys or root_file):
            return True  # the fleet's root, maybe rotated since: it stays
        if root_file:  # agent.toml names the fleet's root now: it replaces the derived one
            TrustedRoot.install(path, Path(root_file).read_bytes())
            return True
        fresh = derive_root(keys)
        if json.loads(fresh)["signed"]["keys"] != json.loads(current)["signed"]["keys"]:
            write_private(path, fresh)  # agent.toml names other keys now: follow it
        return True
    if root_file:
        TrustedRoot.install(path, Path(root_file).read_bytes())
        return True
    if keys:
        write_private(path, derive_root(keys))
        return True
    return False


class DesiredGate:
    """Verify desired states and downgrades for one device; keep its rollback floors."""

    def __init__(self, data_dir: str | Path, *, device_id: str, fleet: str,
                 groups: Iterable[str] = (), trusted_keys: Iterable[str] = (),
                 root_file: str = "", allow_unsigned: bool = False) -> None:
        trust_dir = Path(data_dir) / "trust"
        self.allow_unsigned = allow_unsigned
        self.verifier: ControlVerifier | None = None
        self.authorization: Verified | None = None  # newest verified downgrade
        self._downgrade_path = trust_dir / "downgrade.json"
        if open_root(trust_dir, root_file=root_file, trusted_keys=trusted_keys):
            self.verifier = ControlVerifier(trust_dir, device_id=device_id, fleet=fleet,
                                            groups=groups)
            # kept across restarts: a resumed install checks the floor before the retained
            # authorization arrives again
            if self._downgrade_path.exists():
                try:
                    self.authorization = self.verifier.verify(
                        self._downgrade_path.read_bytes(), kind="downgrade")
                except ControlRefused as exc:
                    log.info("the stored downgrade authorization no longer holds: %s", exc)

    @property
    def enforcing(self) -> bool:
        """True when desired states must be signed (v2); False in development mode."""
        return not self.allow_unsigned

    def desired(self, payload: bytes) -> DesiredState | None:
        """The desired state ``payload`` asks for (None: cleared), or ControlRefused."""
        if self.verifier is None or (self.allow_unsigned and _looks_v1(payload)):
            if not self.allow_unsigned:  # pragma: no cover - config refuses this combination
                raise ControlRefused("no trusted root", reason=Reason.UNSIGNED)
            return parse_desired(payload)  # development only: v1, unsigned
        v = self.verifier.verify(payload, kind="desired")
        return desired_from_control(v, v.key_ids)

    def downgrade(self, payload: bytes) -> Verified | None:
        """Keep the downgrade authorization ``payload`` once verified (None: nothing to keep)."""
        if not payload and self.allow_unsigned:
            return None
        if self.verifier is None:
            raise ControlRefused("no trusted root to verify a downgrade with",
                                 reason=Reason.UNSIGNED, kind="downgrade")
        v = self.verifier.verify(payload, kind="downgrade")
        self.authorization = v
        if v.new:
            write_private(self._downgrade_path, payload)
        return v

    def job(self, payload: bytes) -> Verified:
        """Verify a profile job (kind ``job``) for this device; ``Verified.new`` is False for
        the very message already accepted (a redelivery or a replay: never run it again)."""
        return self._for_device(payload, "job")

    def capture(self, payload: bytes) -> Verified:
        """Verify a capture request (kind ``capture``, release key) for this device."""
        return self._for_device(payload, "capture")

    def _for_device(self, payload: bytes, kind: str) -> Verified:
        if self.verifier is None:
            raise ControlRefused(f"no trusted root to verify a {kind} message with: name "
                                 "`trusted_keys=` or `trust_root=` in agent.toml",
                                 reason=Reason.UNSIGNED, kind=kind)
        return self.verifier.verify(payload, kind=kind)

    def freshness(self, payload: bytes) -> Verified | None:
        """Accept the fleet server's freshness signature (online key)."""
        if self.verifier is None:
            return None
        return self.verifier.verify(payload, kind="freshness")

    def freshness_status(self, bound_s: float) -> FreshnessStatus | None:
        """``fresh``/``stale``/``missing`` and the withheld desired states (``behind``)."""
        if self.verifier is None or bound_s <= 0:
            return None
        return self.verifier.freshness(bound_s)

    def check_floor(self, name: str, version: str, bundle_id: str) -> FloorDecision | None:
        """Refuse (FloorError) a bundle below the rollback floor of ``name`` unless the newest
        downgrade authorization names it; None without a trusted root."""
        if self.verifier is None:
            return None
        return self.verifier.check_floor(name, version, bundle_id, self.authorization)

    def record_install(self, name: str, version: str, *, downgrade: bool = False) -> None:
        if self.verifier is not None:
            self.verifier.record_install(name, version, downgrade=downgrade)


def _looks_v1(payload: bytes) -> bool:
    if not payload:
        return True
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and "signed" not in doc

