"""Deploy a bundle: write the retained desired state that tells a device (or a group) what to run.

The desired state names a bundle that must already be on the broker (its retained
``bundles/{id}/manifest`` message and chunks). Given a bundle file, :func:`deploy` publishes it
first when the broker does not hold it yet; given a bundle id (or a unique prefix of one, as
``fleet status`` prints), the bundle must already be published. Each call writes a fresh
deployment id, so re-deploying the same bundle is visible in the device's events.

What the agent will make of the deployment (wrong target, downgrade) is its decision; ``deploy``
reads the device's last reported state and returns warnings when it can already tell.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.agent.bundle import parse_version, read_bundle, validate_manifest
from edgepack.agent.errors import (
    BrokerError,
    BundleError,
    EdgepackError,
    InstallError,
    ProtocolError,
)
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import (
    DesiredState,
    Topics,
    decode,
    encode,
    parse_chunk_table,
    parse_desired,
)
from edgepack.host.fleet.client import SyncClient

__all__ = ["deploy", "DeployResult", "wait_for_deployment", "new_deployment_id", "active_bundle",
           "clear_desired", "overriding_devices"]

_HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")
_FAILED = ("rejected", "health_failed", "rolled_back", "error")


@dataclass(frozen=True)
class DeployResult:
    """What :func:`deploy` wrote: the desired state's deployment id, the bundle, where it went
    (``device`` or ``group``, its ``topic``), whether the bundle was ``published`` first, and
    ``warnings`` the device's last reported state already gives. For a group, ``overridden``
    lists its devices whose own desired state overrides the group's (they will not follow
    it until that is cleared). After ``wait=``: ``active``, ``waited_s`` and the device's
    ``slot``."""

    deployment_id: str
    bundle_id: str
    name: str
    version: str
    target: str
    fleet: str
    device: str | None
    group: str | None
    topic: str
    published: bool
    allow_downgrade: bool
    ts: float
    broker: str
    warnings: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()
    active: bool | None = None
    waited_s: float | None = None
    slot: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        out["overridden"] = list(self.overridden)
        if self.waited_s is None:
            for k in ("active", "waited_s", "slot"):
                del out[k]
        return out


def new_deployment_id() -> str:
    """``dep-<UTC time>-<random>``: sortable by time, unique, a valid protocol id."""
    return f"dep-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _config(broker: str | BrokerConfig) -> BrokerConfig:
    return parse_broker_url(broker) if isinstance(broker, str) else broker


def deploy(bundle_or_id: str | Path, *, broker: str | BrokerConfig, device: str | None = None,
           group: str | None = None, fleet: str = "default", key: str | Path | None = None,
           allow_downgrade: bool = False, wait: float | None = None, timeout: float = 30.0,
           lookup_timeout: float = 3.0) -> DeployResult:
    """Point ``device`` (or every device of ``group``) at a bundle; return what was written.

    The desired state is a release-signed control message (protocol v2, docs/protocol.md §9)
    signed with ``key`` (else ``$EDGEPACK_KEY``, else ``./keys/fleet.key``); without any key it
    is a v1 unsigned one and a warning says that only development devices accept it. With
    ``allow_downgrade`` and ``device``, a release-signed downgrade authorization for that
    device and bundle is published first.

    ``bundle_or_id`` is a ``.edgepack`` file (published first with ``key`` signing the chunk
    table, unless the broker already holds it) or the id of a published bundle (full sha256 or
    a unique prefix of at least 8 hex digits). With ``wait`` (seconds, ``device`` only), block
    until the device runs the bundle. Raises ProtocolError for an invalid device, group or fleet
    name, BundleError for an unknown or unpublished bundle, InstallError when the device reports
    the deployment failed, BrokerError for broker trouble or when ``wait`` runs out.
    """
    if (device is None) == (group is None):
        raise EdgepackError("deploy to exactly one target: pass `device=` or `group=`",
                            field="device")
    if wait is not None and device is None:
        raise EdgepackError("waiting for a deployment needs a single device: pass `device=`",
                            field="wait")
    topics = Topics(fleet)
    desired_topic = topics.desired(device) if device is not None else topics.group_desired(group)
    cfg = _config(broker)
    path = Path(bundle_or_id)
    text = str(bundle_or_id).strip().lower()
    if path.is_file():
        bundle = read_bundle(path)
        bundle_id, name, version, target = bundle.bundle_id, bundle.name, bundle.version, \
            bundle.target
    elif _HEX_ID.match(text):
        bundle, bundle_id = None, text
    elif path.suffix == ".edgepack" or "/" in str(bundle_or_id):
        raise BundleError(f"bundle file {bundle_or_id!s} does not exist")
    else:
        raise BundleError(f"{bundle_or_id!s} is neither a bundle file nor a bundle id (a sha256 "
                          "hex digest, or a unique prefix of at least 8 hex digits)")

    published = False
    with SyncClient(cfg, timeout=timeout) as client:
        if bundle is None:
            bundle_id = _resolve_prefix(client, topics, bundle_id, cfg, fleet)
        wanted = [topics.bundle_manifest(bundle_id)]
        if device is not None:
            wanted.append(topics.state(device))
        found = _fetch_retained(client, wanted, lookup_timeout)
        raw_table = found.get(topics.bundle_manifest(bundle_id))
        if bundle is None:
            if raw_table is None:
                raise BundleError(
                    f"bundle {bundle_id[:16]} is not published in fleet {fleet!r} on {cfg.url}. "
                    "Publish it first (edgepack publish FILE) or deploy the bundle file, which "
                    "publishes it.", bundle_id=bundle_id)
            manifest = _published_manifest(raw_table, bundle_id)
            name, version, target = manifest["name"], manifest["version"], manifest["target"]
        elif raw_table is None:
            from edgepack.host.fleet.publish import publish_bundle

            result = publish_bundle(path, cfg, key_path=key, fleet=fleet)
            if result.get("bundle_id", bundle_id) != bundle_id:
                raise BundleError(f"publishing {path} produced bundle id "
                                  f"{result['bundle_id'][:16]}, expected {bundle_id[:16]}: was "
                                  "the file modified meanwhile?", bundle_id=bundle_id)
            published = True
        warnings: list[str] = []
        overridden: tuple[str, ...] = ()
        if device is not None:
            warnings = _preflight(found.get(topics.state(device)), device, fleet, bundle_id,
                                  name, version, target, allow_downgrade)
        else:
            overridden = overriding_devices(client, topics, group)
            if overridden:
                warnings.append(_override_warning(group, overridden))
        desired = DesiredState(deployment_id=new_deployment_id(), bundle_id=bundle_id,
                               name=name, version=version, allow_downgrade=allow_downgrade,
                               ts=time.time())
        length = (json.loads(raw_table)["bytes"] if raw_table is not None
                  else path.stat().st_size)
        warnings += _publish_desired(client, topics, desired, length, key=key, fleet=fleet,
                                     device=device, group=group)
    result = DeployResult(
        deployment_id=desired.deployment_id, bundle_id=bundle_id, name=name, version=version,
        target=target, fleet=fleet, device=device, group=group, topic=desired_topic,
        published=published, allow_downgrade=allow_downgrade, ts=desired.ts, broker=cfg.url,
        warnings=tuple(warnings), overridden=overridden)
    if wait is None:
        return result
    t0 = time.monotonic()
    state = wait_for_deployment(cfg, result, timeout=wait)
    return replace(result, active=True, waited_s=round(time.monotonic() - t0, 3),
                   slot=state.get("slot"))


def _publish_desired(client: SyncClient, topics: Topics, desired: DesiredState, length: int,
                     *, key: str | Path | None, fleet: str, device: str | None,
                     group: str | None) -> list[str]:
    """Retain ``desired`` signed with the release key (protocol v2), preceded by a downgrade
    authorization when ``allow_downgrade``; unsigned (v1) only when there is no key at all."""
    from edgepack.agent.trust import Target
    from edgepack.host.fleet.trust import release_signer, sign_desired, sign_downgrade

    topic = topics.desired(device) if device is not None else topics.group_desired(group)
    signer = release_signer(key)
    if signer is None:
        client.publish(topic, encode(desired.to_payload()), qos=1, retain=True)
        return ["no release key: the desired state is unsigned (protocol v1), which devices "
                "refuse unless they run with allow_unsigned (development); pass `key=`"]
    warnings = []
    t = Target(desired.bundle_id, int(length), desired.name, desired.version)
    if desired.allow_downgrade and device is not None:
        client.publish(topics.downgrade(device),
                       sign_downgrade(signer, fleet, device=device, target=t), qos=1,
                       retain=True)
    elif desired.allow_downgrade:
        warnings.append("a downgrade is authorized per device (protocol v2): devices of the "
                        "group whose rollback floor is above this version refuse it; deploy "
                        "to each of them with `device=`")
    client.publish(topic, sign_desired(signer, fleet, target=t,
                                       deployment_id=desired.deployment_id, device=device,
                                       group=group), qos=1, retain=True)
    return warnings


def overriding_devices(client: SyncClient, topics: Topics, group: str) -> tuple[str, ...]:
    """Devices whose retained state says they follow ``group`` and that hold a device-level
    desired state naming a bundle: it wins over any group's (docs/protocol.md §3.4)."""
    states = client.retained(topics.all_devices("state"))
    members = set()
    for topic, raw in states.items():
        try:
            body = decode(raw, f"message on {topic}")
        except ProtocolError:
            continue
        groups = body.get("groups")
        if isinstance(groups, list) and group in groups:
            members.add(topics.parse_device_topic(topic)[0])
    if not members:
        return ()
    out = []
    for topic, raw in client.retained(topics.all_devices("desired")).items():
        dev = topics.parse_device_topic(topic)[0]
        if dev not in members:
            continue
        try:
            if parse_desired(raw) is not None:  # a signed clear names no bundle
                out.append(dev)
        except ProtocolError:
            continue
    return tuple(sorted(out))


def _override_warning(group: str, devices: tuple[str, ...]) -> str:
    shown = ", ".join(devices[:10]) + (f" and {len(devices) - 10} more" if len(devices) > 10
                                       else "")
    return (f"{len(devices)} device(s) of group {group} have their own desired state, which "
            f"overrides the group's, so they will not follow this deployment: {shown}. Clear "
            f"each to hand it back to the group: edgepack fleet clear `device=` {devices[0]}")


def clear_desired(*, broker: str | BrokerConfig, device: str | None = None,
                  group: str | None = None, fleet: str = "default",
                  key: str | Path | None = None) -> tuple[str, bool]:
    """Clear the desired state of ``device`` (it follows its groups again) or ``group``: a
    release-signed desired state naming no bundle (protocol v2 devices refuse an unsigned
    clear); without any release key, the empty retained message of v1. Returns the topic and
    whether the clear was signed."""
    from edgepack.host.fleet.trust import release_signer, sign_desired

    if (device is None) == (group is None):
        raise EdgepackError("clear exactly one desired state: pass `device=` or `group=`",
                            field="device")
    topics = Topics(fleet)
    topic = topics.desired(device) if device is not None else topics.group_desired(group)
    signer = release_signer(key)
    payload = b"" if signer is None else sign_desired(
        signer, fleet, target=None, deployment_id=None, device=device, group=group)
    with SyncClient(_config(broker)) as client:
        client.publish(topic, payload, qos=1, retain=True)
    return topic, signer is not None


def wait_for_deployment(broker: str | BrokerConfig, deployment: DeployResult, *,
                        timeout: float = 300.0) -> dict[str, Any]:
    """Block until the device of ``deployment`` runs the deployed bundle; return its state.

    Raises InstallError when the device reports the deployment rejected, failed or rolled back,
    and BrokerError when ``timeout`` passes first.
    """
    device = deployment.device
    if device is None:
        raise EdgepackError("only a deployment to one device can be waited for: deploy with "
                            "`device=`", field="device")
    topics = Topics(deployment.fleet)
    bundle_id, dep_id = deployment.bundle_id, deployment.deployment_id
    deadline = time.monotonic() + timeout
    cfg = _config(broker)
    with SyncClient(cfg) as client:
        client.subscribe(topics.state(device))
        client.subscribe(topics.events(device))
        while (left := deadline - time.monotonic()) > 0:
            msg = client.get(min(left, 1.0))
            if msg is None or not msg[1]:
                continue
            topic, payload, _ = msg
            try:
                body = decode(payload, f"message on {topic}")
            except ProtocolError:
                continue
            if topic == topics.state(device):
                active = active_bundle(body)
                if active.get("bundle_id") == bundle_id and body.get("online", True):
                    return body
            elif body.get("deployment_id") == dep_id and body.get("kind") in _FAILED:
                detail = body.get("detail") or body.get("reason") or ""
                raise InstallError(
                    f"device {device} reports deployment {dep_id} {body['kind']}"
                    f"{': ' + str(detail) if detail else ''}. See its events for details.",
                    bundle_id=bundle_id)
    raise BrokerError(f"device {device} did not report bundle {bundle_id[:12]} active within "
                      f"{timeout:g}s. Is the device online? (edgepack fleet status)")


def active_bundle(state: dict[str, Any]) -> dict[str, Any]:
    """``{"bundle_id", "name", "version", "slot", "deployment_id"}`` of the active bundle.

    The agent reports it as ``"active": {"bundle_id", "name", "version", "slot", …}`` (None
    before the first install); a bare bundle id string is accepted too.
    """
    active = state.get("active")
    if active is None:
        active = state.get("active_bundle")
    if isinstance(active, str) and _HEX_ID.match(active) and len(active) == 64:
        return {"bundle_id": active, "name": state.get("name"), "version": state.get("version"),
                "slot": state.get("slot"), "deployment_id": None}
    if not isinstance(active, dict):
        return {}
    return {"bundle_id": active.get("bundle_id", active.get("id")), "name": active.get("name"),
            "version": active.get("version"), "slot": active.get("slot", state.get("slot")),
            "deployment_id": active.get("deployment_id")}


def _fetch_retained(client: SyncClient, wanted: list[str], timeout: float) -> dict[str, bytes]:
    """Retained payloads of the exact topics ``wanted``; those absent after ``timeout`` omitted.

    Returns as soon as all arrived, so the only wait is for topics the broker does not hold.
    """
    for topic in wanted:
        client.subscribe(topic)
    out: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(wanted) and (left := deadline - time.monotonic()) > 0:
            msg = client.get(left)
            if msg is None:
                break
            topic, payload, _ = msg
            if topic in wanted and payload:
                out[topic] = payload
    finally:
        for topic in wanted:
            client.unsubscribe(topic)
    return out


def _resolve_prefix(client: SyncClient, topics: Topics, prefix: str, cfg: BrokerConfig,
                    fleet: str) -> str:
    if len(prefix) == 64:
        return prefix
    found = client.retained(topics.prefix + "bundles/+/manifest")
    ids = sorted({bid for t in found if (bid := t.split("/")[-2]).startswith(prefix)})
    if not ids:
        raise BundleError(f"no bundle published in fleet {fleet!r} on {cfg.url} has an id "
                          f"starting with {prefix}. Publish it first (edgepack publish FILE) or "
                          "deploy the bundle file.")
    if len(ids) > 1:
        raise BundleError(f"bundle id prefix {prefix} is ambiguous in fleet {fleet!r}: "
                          f"{', '.join(i[:16] for i in ids)}. Give more digits.")
    return ids[0]


def _published_manifest(raw: bytes, bundle_id: str) -> dict[str, Any]:
    try:
        table = parse_chunk_table(raw, expected_id=bundle_id)
        return validate_manifest(table.manifest)
    except (ProtocolError, BundleError) as exc:
        raise BundleError(f"the published manifest of bundle {bundle_id[:16]} is unusable "
                          f"({exc}). Publish the bundle again.", bundle_id=bundle_id) from None


def _preflight(raw_state: bytes | None, device: str, fleet: str, bundle_id: str, name: str,
               version: str, target: str, allow_downgrade: bool) -> list[str]:
    """What the device's last reported state already says about this deployment."""
    if raw_state is None:
        return [f"device {device} has not reported a state in fleet {fleet!r} yet; it will pick "
                "up the deployment when it connects"]
    try:
        state = decode(raw_state, "device state")
    except ProtocolError:
        return [f"device {device} reports an unreadable state"]
    warnings = []
    if state.get("online") is False:
        warnings.append(f"device {device} is offline; it will pick up the deployment when it "
                        "reconnects")
    dev_target = state.get("target")
    if isinstance(dev_target, str) and dev_target and dev_target != target:
        warnings.append(f"device {device} reports target {dev_target} but the bundle is built "
                        f"for {target}: the agent will reject it")
    active = active_bundle(state)
    if active.get("bundle_id") == bundle_id:
        warnings.append(f"device {device} already runs this bundle")
    elif active.get("name") == name and isinstance(active.get("version"), str):
        try:
            older = parse_version(version) < parse_version(active["version"])
        except BundleError:
            older = False
        if older and not allow_downgrade:
            warnings.append(f"device {device} runs {name} {active['version']}; {version} is a "
                            "downgrade the agent will refuse without `allow_downgrade=`")
    return warnings

