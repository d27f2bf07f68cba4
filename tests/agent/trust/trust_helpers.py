"""Helpers of the trust tests: fixed keys in every role, bundle targets, a settable clock.

Every signature is real (Ed25519 through securesystemslib); nothing is mocked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from edgepack.agent.trust import Target
from edgepack.host.fleet.keyring import create_root, signer_from_seed
from edgepack.host.fleet.trust import ControlSigner

FLEET, DEVICE, GROUP = "fleet-a", "pi-1", "cams"
NOW = 1_900_000_000.0


def key(name: str):
    """A fixed Ed25519 signer per name (test keys, derived from the name)."""
    return signer_from_seed(hashlib.sha256(f"edgepack-test:{name}".encode()).digest())


def bundle(version: str = "1.0.0", name: str = "digits", length: int = 13195) -> Target:
    """A bundle target whose id is derived from its name and version."""
    return Target(hashlib.sha256(f"{name}-{version}".encode()).hexdigest(), length, name,
                  version)


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Pki:
    """Root (2 of 3), release and online keys of one fleet, and signers for each role."""

    clock: Clock
    roots: list = field(default_factory=lambda: [key("root-1"), key("root-2"), key("root-3")])
    release_key: object = field(default_factory=lambda: key("release-1"))
    online_key: object = field(default_factory=lambda: key("online-1"))
    stranger: object = field(default_factory=lambda: key("stranger"))

    def root(self) -> bytes:
        from datetime import datetime, timezone

        return create_root(root_signers=self.roots[:2], root_threshold=2,
                           release_keys=[self.release_key.public_key],
                           online_keys=[self.online_key.public_key],
                           expires=datetime.fromtimestamp(NOW + 365 * 86400, timezone.utc))

    def signer(self, *keys, fleet: str = FLEET) -> ControlSigner:
        return ControlSigner(fleet, list(keys), clock=self.clock)

    @cached_property
    def release(self) -> ControlSigner:
        return self.signer(self.release_key)

    @cached_property
    def online(self) -> ControlSigner:
        return self.signer(self.online_key)
