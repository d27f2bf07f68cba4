"""Sign control messages (protocol v2) for devices: desired states, downgrade authorizations,
profile jobs, capture requests and freshness.

A :class:`ControlSigner` holds the keys of one role (release keys on an operator's machine, the
online key on the fleet server) and makes python-tuf ``targets`` metadata as
``edgepack.agent.trust.control`` describes, signed with :meth:`Metadata.sign`.

Versions only go up, and two signers (a release laptop and the fleet server) must never need to
share a counter: a version is ``max(last + 1, now)`` in unix seconds, the last one persisted per
message key. Expiries are relative to the signer's clock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.agent.trust.control import Target, target_path

__all__ = [
    "DESIRED_LIFETIME_S",
    "DOWNGRADE_LIFETIME_S",
    "JOB_LIFETIME_S",
    "FRESHNESS_INTERVAL_S",
    "FRESHNESS_LIFETIME_S",
    "ControlSigner",
    "FreshnessBeacon",
    "release_key_path",
    "release_signer",
    "sign_capture",
    "sign_desired",
    "sign_downgrade",
    "sign_job",
    "signed_version",
]

DESIRED_LIFETIME_S = 30 * 86400     # re-signed by the operator before a month passes
DOWNGRADE_LIFETIME_S = 7 * 86400    # an authorization is used soon or not at all
JOB_LIFETIME_S = 3600
FRESHNESS_INTERVAL_S = 600          # the fleet server re-signs freshness this often
FRESHNESS_LIFETIME_S = 3600         # so a missed re-signing or two does not expire it


class ControlSigner:
    """Make signed control messages for ``fleet`` with ``signers`` (one role's keys).

    ``state_path`` keeps the last version per message key (so a restart never reuses one).
    """

    def __init__(self, fleet: str, signers: Sequence[Any], *,
                 state_path: str | os.PathLike | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.fleet, self.signers, self.clock = fleet, list(signers), clock
        self.state_path = Path(state_path) if state_path else None
        self._last: dict[str, int] = {}
        if self.state_path and self.state_path.exists():
            self._last = {k: int(v) for k, v in json.loads(self.state_path.read_bytes()).items()}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(s.public_key.keyid for s in self.signers)

    def next_version(self, key: str) -> int:
        """``max(last + 1, now)`` for message key ``kind/scope/subject``; persisted."""
        v = max(self._last.get(key, 0) + 1, int(self.clock()))
        self._last[key] = v
        if self.state_path:
            tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
            tmp.write_text(json.dumps(self._last, sort_keys=True))
            os.replace(tmp, self.state_path)
        return v

    def sign(self, kind: str, scope: str, subject: str, *, targets: Sequence[Target] = (),
             fields: Mapping[str, Any] | None = None, lifetime_s: float,
             version: int | None = None) -> bytes:
        """The signed control message (compact JSON bytes, what goes on the wire)."""
        from tuf.api.metadata import Metadata, TargetFile, Targets

        now = self.clock()
        key = f"{kind}/{scope}/{subject}"
        files = {}
        for t in targets:
            path = target_path(t.bundle_id)
            custom = {k: v for k, v in (("name", t.name), ("version", t.version)) if v}
            files[path] = TargetFile(t.length, {"sha256": t.bundle_id}, path,
                                     {"custom": custom} if custom else None)
        ep = {"kind": kind, "fleet": self.fleet, "for": {scope: subject}, "issued": int(now),
              **(fields or {})}
        signed = Targets(version=version if version is not None else self.next_version(key),
                         expires=datetime.fromtimestamp(int(now + lifetime_s), timezone.utc),
                         targets=files, unrecognized_fields={"edgepack": ep})
        md = Metadata(signed)
        for s in self.signers:
            md.sign(s, append=True)
        return md.to_bytes()

    def desired(self, *, target: Target | None, deployment_id: str | None = None,
                device: str | None = None, group: str | None = None,
                authorization: bytes | None = None,
                lifetime_s: float = DESIRED_LIFETIME_S, version: int | None = None) -> bytes:
        """A desired state for one device or one group; ``target=None`` clears it.

        An online signer assigning a device passes ``authorization``: the release-signed
        desired state (bytes) of a group the device follows, naming the same bundle.
        """
        scope, subject = ("device", device) if device else ("group", group)
        fields: dict[str, Any] = {}
        if deployment_id is not None:
            fields["deployment_id"] = deployment_id
        if authorization is not None:
            fields["authorization"] = json.loads(authorization)
        return self.sign("desired", scope, subject, targets=[target] if target else [],
                         fields=fields, lifetime_s=lifetime_s, version=version)

    def downgrade(self, *, device: str, target: Target,
                  lifetime_s: float = DOWNGRADE_LIFETIME_S, version: int | None = None) -> bytes:
        """Authorize ``device`` to install ``target`` (name, version, sha256) below its floor."""
        return self.sign("downgrade", "device", device, targets=[target],
                         lifetime_s=lifetime_s, version=version)

    def job(self, *, device: str, job: Mapping[str, Any], targets: Sequence[Target] = (),
            lifetime_s: float = JOB_LIFETIME_S, version: int | None = None) -> bytes:
        """A profile job (the v1 job object without ``sig``/``ts``) bound to ``device``."""
        return self.sign("job", "device", device, targets=targets, fields={"job": dict(job)},
                         lifetime_s=lifetime_s, version=version)

    def capture(self, *, device: str, request: Mapping[str, Any],
                lifetime_s: float = JOB_LIFETIME_S, version: int | None = None) -> bytes:
        """A capture request (which inputs to record and send) bound to ``device``."""
        return self.sign("capture", "device", device, fields={"capture": dict(request)},
                         lifetime_s=lifetime_s, version=version)

    def freshness(self, *, versions: Mapping[str, int], device: str | None = None,
                  group: str | None = None, lifetime_s: float = FRESHNESS_LIFETIME_S,
                  version: int | None = None) -> bytes:
        """The fleet server's freshness signature: it is alive now, and these are the newest
        versions of the desired states (``desired/group/g``: version) it published."""
        scope, subject = (("device", device) if device else ("group", group) if group
                          else ("fleet", self.fleet))
        return self.sign("freshness", scope, subject, fields={"versions": dict(versions)},
                         lifetime_s=lifetime_s, version=version)


# -- release signing for deploy and rollouts (protocol v2) ----------------------------------

#: where :func:`release_signer` looks when no key is passed: ``$EDGEPACK_KEY``, then the key
#: ``edgepack keys generate --out keys/`` writes in the working directory
DEFAULT_KEY_ENV = "EDGEPACK_KEY"
DEFAULT_KEY_PATH = Path("keys") / "fleet.key"


def release_key_path(key: str | os.PathLike | None) -> Path | None:
    """``key``, else ``$EDGEPACK_KEY``, else ``./keys/fleet.key`` when it exists (absolute);
    None when there is none."""
    if key is None:
        env = os.environ.get(DEFAULT_KEY_ENV)
        key = env if env else (DEFAULT_KEY_PATH if DEFAULT_KEY_PATH.is_file() else None)
    return Path(key).absolute() if key is not None else None


def release_signer(key: str | os.PathLike | None) -> Any | None:
    """The release key that signs desired states (:func:`release_key_path`: a PEM Ed25519 key
    file, 0600, such as ``fleet.key`` or the ``release.key`` of ``edgepack keys init``); None
    when there is none."""
    from edgepack.host.fleet.keyring import load_signer

    path = release_key_path(key)
    return load_signer(path) if path is not None else None


def signed_version(payload: bytes | None) -> int:
    """The ``signed.version`` of a retained v2 message (0: none, or not a v2 message)."""
    if not payload:
        return 0
    try:
        v = json.loads(payload)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        return 0
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def sign_desired(signer: Any | Sequence[Any], fleet: str, *, target: Target | None,
                 deployment_id: str | None, device: str | None = None,
                 group: str | None = None, previous: bytes | None = None,
                 lifetime_s: float = DESIRED_LIFETIME_S) -> bytes:
    """A release-signed desired state whose version is above ``previous`` (the retained
    message it replaces), above the current second and above what this process signed for the
    same device or group: devices refuse anything not newer."""
    scope, subject = ("device", device) if device else ("group", group)
    cs = ControlSigner(fleet, _signers(signer))
    return cs.desired(target=target, deployment_id=deployment_id, device=device, group=group,
                      lifetime_s=lifetime_s,
                      version=_next(cs, f"desired/{scope}/{subject}", previous))


def sign_downgrade(signer: Any | Sequence[Any], fleet: str, *, device: str, target: Target,
                   previous: bytes | None = None) -> bytes:
    """A release-signed authorization for ``device`` to install ``target`` below its floor."""
    cs = ControlSigner(fleet, _signers(signer))
    return cs.downgrade(device=device, target=target,
                        version=_next(cs, f"downgrade/device/{device}", previous))


def sign_job(signer: Any | Sequence[Any], fleet: str, *, device: str, job: Mapping[str, Any],
             targets: Sequence[Target], lifetime_s: float = JOB_LIFETIME_S) -> bytes:
    """A profile job for ``device`` naming its bundles (and eval samples) as targets; its
    version is above every job this process signed for that device and the current second."""
    cs = ControlSigner(fleet, _signers(signer))
    return cs.job(device=device, job=job, targets=targets, lifetime_s=lifetime_s,
                  version=_next(cs, f"job/device/{device}", None))


def sign_capture(signer: Any | Sequence[Any], fleet: str, *, device: str,
                 request: Mapping[str, Any], lifetime_s: float,
                 previous: bytes | None = None) -> bytes:
    """A release-signed capture request (start, stop or pull) for ``device``, newer than
    ``previous`` (the retained request it replaces)."""
    cs = ControlSigner(fleet, _signers(signer))
    return cs.capture(device=device, request=request, lifetime_s=lifetime_s,
                      version=_next(cs, f"capture/device/{device}", previous))


def _signers(signer: Any) -> list[Any]:
    """One signer, or several (a threshold above one, or keys of several roots)."""
    return list(signer) if isinstance(signer, (list, tuple)) else [signer]


_LAST: dict[tuple[str, str], int] = {}  # versions this process signed: never twice the same


def _next(cs: ControlSigner, key: str, previous: bytes | None) -> int:
    v = max(signed_version(previous) + 1, int(cs.clock()), _LAST.get((cs.fleet, key), 0) + 1)
    _LAST[(cs.fleet, key)] = v
    return v


class FreshnessBeacon:
    """The fleet server's freshness signature (protocol v2): every ``interval_s``, sign with the
    online key which desired-state versions are current and retain it on ``{fleet}/freshness``;
    devices report ``stale`` when it stops coming (a withheld or frozen control plane) and
    ``behind`` for a desired state of theirs that is newer than what they hold.

    ``run`` in a thread (:meth:`start`/:meth:`close`), or call :meth:`publish_once`.
    """

    def __init__(self, broker: Any, fleet: str, signer: Any, *,
                 interval_s: float = FRESHNESS_INTERVAL_S,
                 lifetime_s: float = FRESHNESS_LIFETIME_S) -> None:
        import threading

        self.broker, self.fleet, self.interval_s, self.lifetime_s = (broker, fleet, interval_s,
                                                                     lifetime_s)
        self.signer = ControlSigner(fleet, _signers(signer))
        self.published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def versions(self, client: Any) -> dict[str, int]:
        """Message key → signed version of every retained v2 desired state of the fleet."""
        from edgepack.agent.protocol import Topics

        t = Topics(self.fleet)
        out = {}
        for scope, pattern in (("device", t.all_devices("desired")),
                               ("group", f"{t.prefix}groups/+/desired")):
            for topic, payload in client.retained(pattern, settle=0.3).items():
                v = signed_version(payload)
                if v:
                    out[f"desired/{scope}/{topic.split('/')[-2]}"] = v
        return out

    def publish_once(self) -> bytes:
        from edgepack.agent.protocol import Topics
        from edgepack.host.fleet.client import SyncClient

        with SyncClient(self.broker, timeout=15) as c:
            payload = self.signer.freshness(versions=self.versions(c),
                                            lifetime_s=self.lifetime_s,
                                            version=_next(self.signer, "freshness/fleet", None))
            c.publish(Topics(self.fleet).freshness, payload, qos=1, retain=True)
        self.published += 1
        return payload

    def _run(self) -> None:
        import logging

        while not self._stop.is_set():
            try:
                self.publish_once()
            except Exception as exc:  # noqa: BLE001 - a broker outage must not end the beacon
                logging.getLogger("edgepack.fleet").warning("freshness not published: %s", exc)
            self._stop.wait(self.interval_s)

    def start(self) -> FreshnessBeacon:
        import threading

        self._thread = threading.Thread(target=self._run, name="edgepack-freshness",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
