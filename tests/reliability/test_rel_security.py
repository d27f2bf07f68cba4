"""A device runs only what its owner signed: unsigned, foreign-key, tampered (any single byte of
any member, positions sampled) and downgraded bundles never activate; replaying an old desired
state (or an edited, unsigned, expired, misaddressed or foreign-signed one) does not
downgrade, nor a bundle below the rollback floor; TLS with a private CA and client certificates against a real
Mosquitto running the shipped config, whose ACL keeps devices apart (tests/host/fleet/deploy helpers)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
import zipfile
from pathlib import Path

import pytest
from agent_helpers import agent_config, publish_desired, signed_desired
from reliability_helpers import CrashableAgent, Recorder, save_scenario, serves, wait_for

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import BrokerError, BundleError
from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import (
    DesiredState,
    Topics,
    chunk_table_payload,
    encode,
    parse_desired,
)
from edgepack.agent.signing import canonical_json, load_public_keys
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.publish import publish_bundle

SAMPLES = int(os.environ.get("EDGEPACK_TAMPER_SAMPLES", "40"))


def _members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i, zf.read(i)) for i in zf.infolist()]


def _rezip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


def _device_accepts(path: Path, keys: dict) -> bytes | None:
    """What the agent does before staging: read (structure, every hash), check the signature,
    unpack. Returns the unpacked content of every member, or None when refused."""
    bid = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        b = read_bundle(path, bundle_id=bid)
        b.verify(keys)
        return b"".join(b.read_member(n) for n in b.member_names()) + b.manifest_bytes
    except BundleError:  # SignatureError included
        return None


def test_tampering_any_byte_of_any_member(tmp_path, rel_bundles, rel_keys, scenario):
    """Every member, ``SAMPLES`` sampled byte positions each (first and last included): the
    changed bundle is refused. Then raw flips anywhere in the file: refused, or (a flip in zip
    bookkeeping such as a timestamp) the content the device would install is unchanged."""
    rec = scenario("tampered bundle: one byte of a member")
    rec_raw = scenario("tampered bundle: one raw byte of the file")
    rng = random.Random(6)
    keys = load_public_keys([rel_keys.pub])
    good = rel_bundles.get("1.0.0")
    original = _device_accepts(good, keys)
    assert original is not None
    members = _members(good)
    path = tmp_path / "t.edgepack"
    for m, (info, data) in enumerate(members):
        positions = {0, len(data) - 1} | {rng.randrange(len(data)) for _ in range(SAMPLES)}
        for pos in sorted(positions):
            changed = bytearray(data)
            changed[pos] ^= rng.randrange(1, 256)
            path.write_bytes(_rezip([(i, bytes(changed) if k == m else d)
                                     for k, (i, d) in enumerate(members)]))
            ok = _device_accepts(path, keys) is None
            rec.run(ok, note=None if ok else f"{info.filename}[{pos}] changed and accepted")
            assert ok, f"{info.filename} byte {pos} changed, and the device accepted it"
    raw = good.read_bytes()
    for pos in sorted({rng.randrange(len(raw)) for _ in range(SAMPLES * 5)}):
        changed = bytearray(raw)
        changed[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(changed))
        got = _device_accepts(path, keys)
        ok = got is None or got == original
        rec_raw.run(ok, note=None if ok else f"file byte {pos} changed the installed content")
        assert ok


def _publish_raw(client: SyncClient, fleet: str, data: bytes, *, sign_key, manifest: dict,
                 chunk_size: int = 4096, alter_chunk: int | None = None) -> str:
    """Publish any bytes as a bundle (what a publisher holding the fleet key, or a broker
    replaying its messages, could do), with a chunk table signed by ``sign_key``."""
    from edgepack.host.keys import sign_bytes

    t = Topics(fleet)
    bid = hashlib.sha256(data).hexdigest()
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    table = chunk_table_payload(bid, len(data), chunk_size,
                                [hashlib.sha256(c).hexdigest() for c in chunks])
    for i, c in enumerate(chunks):
        if i == alter_chunk:
            c = bytes([c[0] ^ 1]) + c[1:]
        client.publish(t.bundle_chunk(bid, i), c, retain=True)
    sig = sign_bytes(canonical_json(table), sign_key) if sign_key is not None else None
    client.publish(t.bundle_manifest(bid), encode({**table, "manifest": manifest,
                                                   "signature": None, "table_sig": sig}),
                   retain=True)
    return bid


@pytest.mark.broker
def test_only_signed_current_bundles_activate(tmp_path, mosquitto, fleet, rel_bundles, rel_keys,
                                              scenario):
    rec = scenario("unsigned / foreign / tampered / downgrade / replay via agent")
    url = mosquitto.url
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=rel_keys.pub)
    data = cfg.parent / "data"
    agent = CrashableAgent(cfg)
    v1 = rel_bundles.get("1.0.0")
    v2 = rel_bundles.get("2.0.0")
    ids = {}
    attacks = []
    try:
        with Recorder(url, fleet) as r, SyncClient(url) as c:
            agent.start()
            for v, p in (("1.0.0", v1), ("2.0.0", v2)):
                ids[v] = publish_bundle(p, url, key_path=rel_keys.key, fleet=fleet,
                                        chunk_size=4096)["bundle_id"]
            dep1 = publish_desired(url, fleet, ids["1.0.0"])
            r.wait_event("installed", dep1, timeout=30)
            dep1_payload = c.retained(Topics(fleet).desired("dev1"))[Topics(fleet).desired("dev1")]
            dep2 = publish_desired(url, fleet, ids["2.0.0"], version="2.0.0")
            r.wait_event("installed", dep2, timeout=30)
            active = ids["2.0.0"]
            manifest3 = json.loads(_members(rel_bundles.get("3.0.0"))[0][1])

            def attack(name: str, bid: str, version: str, reasons: tuple[str, ...]) -> None:
                since = len(r.events)
                dep = publish_desired(url, fleet, bid, version=version)
                ev = r.wait(lambda: next((e for e in r.events[since:]
                                          if e.get("deployment_id") == dep
                                          and e["kind"] in ("rejected", "installed",
                                                            "rolled_back")), None), 30, name)
                ok = ev["kind"] == "rejected" and ev.get("reason") in reasons
                time.sleep(0.2)
                ok = ok and serves(data, active) and agent.alive
                attacks.append((name, ok, ev["kind"], ev.get("reason")))
                rec.run(ok, note=None if ok else f"{name}: {ev['kind']} {ev.get('reason')}")

            def refused(name: str, payload: bytes, reason: str, *,
                        topic: str = Topics(fleet).desired("dev1")) -> dict:
                """A control message published as an attacker would: the device answers
                ``control_refused`` with the reason and key ids, and keeps its bundle."""
                since = len(r.events)
                c.publish(topic, payload, retain=True)
                ev = r.wait(lambda: next((e for e in r.events[since:]
                                          if e["kind"] in ("control_refused", "rejected",
                                                           "installed")), None), 30, name)
                ok = ev["kind"] == "control_refused" and ev.get("reason") == reason \
                    and ev.get("topic") == topic
                time.sleep(0.2)
                ok = ok and serves(data, active) and agent.alive
                attacks.append((name, ok, ev["kind"], ev.get("reason")))
                rec.run(ok, note=None if ok else f"{name}: {ev['kind']} {ev.get('reason')}")
                return ev

            # 1. a bundle without signature.json, its chunk table signed by the fleet key
            unsigned = rel_bundles.get("3.0.0", signer=None)
            attack("unsigned bundle", _publish_raw(c, fleet, unsigned.read_bytes(),
                                                   sign_key=rel_keys.private,
                                                   manifest=manifest3), "3.0.0", ("signature",))
            # 2. a bundle signed by a foreign key (chunk table signed by the fleet key)
            foreign = rel_bundles.get("3.0.0", signer="other")
            attack("foreign-key bundle", _publish_raw(c, fleet, foreign.read_bytes(),
                                                      sign_key=rel_keys.private,
                                                      manifest=manifest3), "3.0.0",
                   ("signature",))
            # 3. chunk table signed by a foreign key, or not at all: refused before any chunk
            good3 = rel_bundles.get("3.0.0").read_bytes()
            attack("foreign-key chunk table", _publish_raw(c, fleet, good3,
                                                           sign_key=rel_keys.other_private,
                                                           manifest=manifest3), "3.0.0",
                   ("signature",))
            c.publish(Topics(fleet).bundle_manifest(hashlib.sha256(good3).hexdigest()), b"",
                      retain=True)
            attack("unsigned chunk table", _publish_raw(c, fleet, good3, sign_key=None,
                                                        manifest=manifest3), "3.0.0",
                   ("signature",))
            # 4. one byte of the model changed, zip rebuilt, table signed by the fleet key
            members = _members(rel_bundles.get("3.0.0"))
            members = [(i, (d[:100] + bytes([d[100] ^ 0x40]) + d[101:])
                        if i.filename == "model.onnx" else d) for i, d in members]
            attack("tampered member", _publish_raw(c, fleet, _rezip(members),
                                                   sign_key=rel_keys.private,
                                                   manifest=manifest3), "3.0.0",
                   ("invalid", "tampered", "signature"))
            # 5. a retained chunk altered on the broker after a correct table was published
            attack("tampered chunk on the broker", _publish_raw(
                c, fleet, rel_bundles.get("4.0.0").read_bytes(), sign_key=rel_keys.private,
                manifest=json.loads(_members(rel_bundles.get("4.0.0"))[0][1]), alter_chunk=1),
                "4.0.0", ("tampered",))
            # 6. a downgrade to v1 (release-signed, published), without a downgrade
            #    authorization: below the rollback floor (protocol v2)
            attack("downgrade", ids["1.0.0"], "1.0.0", ("below_floor",))
            # 7. v1 re-published with a lying (unsigned) manifest object claiming 9.9.9: the
            #    verified manifest is not what the desired state signed
            lying = json.loads(_members(v1)[0][1]) | {"version": "9.9.9"}
            bid_lying = _publish_raw(c, fleet, v1.read_bytes(), sign_key=rel_keys.private,
                                     manifest=lying)
            assert bid_lying == ids["1.0.0"]
            attack("downgrade behind a lying manifest message", bid_lying, "9.9.9",
                   ("below_floor", "invalid"))
            # 8. the old desired state of deployment 1, replayed byte for byte
            ev = refused("replayed old desired state", dep1_payload, "replayed")
            assert ev["key_ids"] and ev["version"] is not None
            # 9. the current desired state edited: v1's id and allow_downgrade
            doc = json.loads(c.retained(Topics(fleet).desired("dev1"))[
                Topics(fleet).desired("dev1")])
            t = doc["signed"]["targets"]
            path, tf = next(iter(t.items()))
            t.pop(path)
            t[f"bundles/{ids['1.0.0']}"] = tf | {"hashes": {"sha256": ids["1.0.0"]}}
            doc["signed"]["edgepack"]["allow_downgrade"] = True
            refused("forged downgrade (edited desired state)", json.dumps(doc).encode(),
                    "bad_signature")
            # 10. a v1 unsigned desired state with allow_downgrade
            v1_desired = DesiredState(deployment_id="d-forged", bundle_id=ids["1.0.0"],
                                      name="tiny", version="1.0.0", allow_downgrade=True)
            refused("unsigned desired state", encode(v1_desired.to_payload()), "unsigned")
            # 11. a genuine-looking message that expired, one for another device, one signed
            #     by a key the device does not trust
            from agent_helpers import signed_desired

            from edgepack.agent.trust import Target
            from edgepack.host.fleet.keyring import load_signer
            from edgepack.host.fleet.trust import sign_desired

            t1 = Target(ids["1.0.0"], v1.stat().st_size, "tiny", "1.0.0")
            refused("expired desired state", sign_desired(
                load_signer(rel_keys.key), fleet, target=t1, deployment_id="d-old",
                device="dev1", lifetime_s=-3600), "expired")
            refused("desired state for another device", signed_desired(
                fleet, ids["1.0.0"], length=t1.length, device_id="dev2", key=rel_keys.key,
                version="1.0.0"), "wrong_device")
            refused("desired state signed by a foreign key", signed_desired(
                fleet, ids["1.0.0"], length=t1.length, key=rel_keys.other_key,
                version="1.0.0"), "unknown_key")
            # 12. another model name in between: the floor of `tiny` stays 2.0.0
            other = rel_bundles.get("1.0.0", name="other")
            publish_bundle(other, url, key_path=rel_keys.key, fleet=fleet, chunk_size=4096)
            dep_o = publish_desired(url, fleet, read_bundle(other).bundle_id, name="other")
            r.wait_event("installed", dep_o, timeout=30)
            active = read_bundle(other).bundle_id
            attack("older bundle of a model name that ran before, below its floor",
                   ids["1.0.0"], "1.0.0", ("below_floor",))
            wait_for(lambda: serves(data, active), 10, "the last genuine bundle still served")
    finally:
        agent.stop()
    failed = [a for a in attacks if not a[1]]
    assert not failed, failed
    assert len(attacks) == 15


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    from shipped_mosquitto import start_shipped_mosquitto

    b = start_shipped_mosquitto(tmp_path_factory.mktemp("rel-secure"), {"dev-p": "pw-p"})
    yield b
    b.stop()


@pytest.mark.broker
def test_tls_private_ca_client_certs_and_acl(tmp_path, secure_broker, rel_bundles, rel_keys,
                                             scenario):
    """A real agent over mutual TLS to Mosquitto running the shipped config and ACL: it installs
    a bundle; another device can neither read its desired state, nor write its telemetry, nor
    deploy to it; certificates from a rogue CA are refused."""
    rec = scenario("TLS (private CA, client certs) + shipped ACL")
    b = secure_broker
    fleet = f"sec{os.getpid()}"
    t = Topics(fleet)
    op_cert = b.operator_ca.issue("edgepack-host")
    op = BrokerConfig(host="127.0.0.1", port=b.operator_port, tls=True,
                      ca=str(b.device_ca.cert_path), cert=str(op_cert.cert),
                      key=str(op_cert.key), connect_timeout=5)

    def device(cn: str, ca=None) -> BrokerConfig:
        cert = b.device_cert(cn) if ca is None else ca.issue(cn)
        return BrokerConfig(host="127.0.0.1", port=b.device_port, tls=True,
                            ca=str(b.device_ca.cert_path), cert=str(cert.cert),
                            key=str(cert.key), connect_timeout=3)

    dev_a = device("dev-a")
    cfg = agent_config(tmp_path / "dev-a", f"mqtts://127.0.0.1:{b.device_port}", fleet,
                       device_id="dev-a", pub=rel_keys.pub,
                       broker={"ca": dev_a.ca, "cert": dev_a.cert, "key": dev_a.key})
    agent = CrashableAgent(cfg).start()
    checks: list[tuple[str, bool]] = []
    try:
        with SyncClient(op, timeout=10) as o:
            o.subscribe(t.prefix + "devices/#")
            info = publish_bundle(rel_bundles.get("1.0.0"), op, key_path=rel_keys.key,
                                  fleet=fleet, chunk_size=4096)
            o.publish(t.desired("dev-a"), signed_desired(
                fleet, info["bundle_id"], length=rel_bundles.get("1.0.0").stat().st_size,
                device_id="dev-a", deployment_id="dep-tls-1", key=rel_keys.key), retain=True)
            seen: dict[str, list[bytes]] = {}
            deadline = time.monotonic() + 40
            installed = False
            while time.monotonic() < deadline and not installed:
                m = o.get(0.5)
                if m is None:
                    continue
                seen.setdefault(m[0], []).append(m[1])
                installed = m[0] == t.events("dev-a") and json.loads(m[1]).get(
                    "kind") == "installed"
            checks.append(("agent installs over mutual TLS", installed))

            # another device: cannot read dev-a's desired state, write its telemetry or
            # events, or deploy to it
            with SyncClient(device("dev-b"), timeout=5) as other:
                other.subscribe(t.desired("dev-a"))
                other.subscribe(t.prefix + "devices/+/desired")
                got = []
                while (m := other.get(1.0)) is not None:
                    got.append(m[0])
                checks.append(("other device cannot read dev-a's desired state",
                               t.desired("dev-a") not in got))
                while o.get(0.3) is not None:
                    pass
                other.publish(t.telemetry("dev-a"), b'{"forged": true}')
                other.publish(t.events("dev-a"), b'{"kind": "installed", "forged": true}')
                other.publish(t.desired("dev-a"), encode(DesiredState(
                    "dep-hijack", "ee" * 32, "evil", "9.9.9").to_payload()), retain=True)
                forged = []
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    m = o.get(0.2)
                    if m is not None and b"forged" in m[1] or m is not None and \
                            m[0] == t.desired("dev-a"):
                        forged.append(m[0])
                checks.append(("other device cannot write dev-a's telemetry/events/desired",
                               not forged))
            retained = o.retained(t.desired("dev-a"))
            checks.append(("dev-a's desired state untouched",
                           parse_desired(retained[t.desired("dev-a")]).deployment_id
                           == "dep-tls-1"))
        # a certificate from a CA the broker does not trust
        try:
            with SyncClient(device("dev-a", ca=b.rogue_ca), timeout=3):
                refused = False
        except BrokerError:
            refused = True
        checks.append(("rogue-CA client certificate refused", refused))
        checks.append(("agent still running", agent.alive))
    finally:
        agent.stop()
    for name, ok in checks:
        rec.run(ok, note=None if ok else name)
    rec.notes.append(f"{len(checks)} checks")
    save_scenario(rec)
    assert all(ok for _, ok in checks), [n for n, ok in checks if not ok]
