"""Rebuild the test vectors of docs/vectors/ (protocol v2 trust, chunk tables, a tiny bundle).

    python docs/vectors/make_vectors.py [OUT_DIR]

Deterministic: every key comes from a fixed seed (sha256 of its name), every timestamp is
fixed, and Ed25519 signatures are deterministic, so running it twice writes the same bytes.
Valid messages expire on 2100-01-01; ``tests/agent/trust/test_trust_vectors.py`` proves that
each file verifies or fails as ``vectors.json`` says, and that this script rebuilds them.

THE KEYS IN keys.json ARE PUBLISHED TEST KEYS. NEVER TRUST THEM IN A FLEET.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgepack.agent.identity import DeviceIdentity
from edgepack.agent.signing import canonical_json, key_id
from edgepack.agent.trust import Target
from edgepack.host.fleet.keyring import create_root, rotate_root, signer_from_seed
from edgepack.host.fleet.trust import ControlSigner

FLEET, DEVICE, GROUP = "vectors", "device-1", "group-1"
ISSUED = 1767225600          # 2026-01-01T00:00:00Z
FAR = 4102444800             # 2100-01-01T00:00:00Z: valid vectors expire then
LIFETIME = FAR - ISSUED
KEY_NAMES = ("root-1", "root-2", "root-3", "release-1", "online-1", "online-2", "stranger",
             "device-1", "fleet-v1")
WARNING = ("TEST ONLY: these private keys are published. Never trust them in a fleet.")


def seed(name: str) -> bytes:
    return hashlib.sha256(f"edgepack test vector key: {name}".encode()).digest()


def _bundle() -> tuple[bytes, Target]:
    """A deterministic 10 000-byte stand-in for a bundle file (chunked below)."""
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(313))[:10000]
    return data, Target(hashlib.sha256(data).hexdigest(), len(data), "digits", "1.2.0")


def _keys(signers: dict) -> dict:
    out = {}
    for name, s in signers.items():
        raw = s.public_key.keyval["public"]
        out[name] = {"seed": seed(name).hex(), "public": raw, "keyid": s.public_key.keyid}
    out["fleet-v1"]["key_id_v1"] = key_id(signers["fleet-v1"]._private_key.public_key())
    return {"TEST_ONLY": WARNING, "algorithm": "ed25519", "keys": out}


def _chunk_table(bundle: bytes, signer) -> dict:
    """Today's v1 retained manifest message fields: the chunk table and ``table_sig``."""
    size, chunk = len(bundle), 4096
    table = {"bundle_id": hashlib.sha256(bundle).hexdigest(), "bytes": size,
             "chunk_size": chunk,
             "chunks": [hashlib.sha256(bundle[i:i + chunk]).hexdigest()
                        for i in range(0, size, chunk)]}
    priv = signer._private_key
    sig = {"alg": "ed25519", "key_id": key_id(priv.public_key()),
           "sig": base64.b64encode(priv.sign(canonical_json(table))).decode()}
    return {**table, "table_sig": sig, "canonical": canonical_json(table).decode()}


# A one-node ONNX model (Relu on a float32 [1, 4] tensor, opset 17, IR 8), serialized once and
# kept as bytes so that the vectors do not depend on the onnx package's version.
TINY_MODEL = bytes.fromhex(
    "08081210656467657061636b2d766563746f72733a3e0a0c0a0178120179220452656c75120474696e795a13"
    "0a0178120e0a0c080112080a0208010a02080462130a0179120e0a0c080112080a0208010a02080442040a00"
    "1011")
TINY_CHUNK = 1024  # bytes per chunk in the tiny bundle's manifest message


def _tiny_bundle(out: Path, signer) -> tuple[bytes, dict, dict]:
    """``bundle/tiny.edgepack`` (signed by release-1), its retained manifest message
    (chunk table, ``table_sig``) and the expected digests."""
    import numpy as np

    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.fleet.publish import manifest_message
    from edgepack.host.keys import sign_bytes

    x = np.array([[[-1.0, -0.5, 0.5, 1.0]], [[2.0, -2.0, 0.25, 0.0]]], dtype=np.float32)
    golden = npz_bytes({"input_0": x, "output_0": np.maximum(x, 0)})
    manifest = {
        "name": "tiny", "version": "1.0.0", "created": "2026-01-01T00:00:00Z",
        "target": "x86-64-avx2",
        "model": {"file": "model.onnx", "format": "onnx", "opset": 17,
                  "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4],
                              "quantization": None}],
                  "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4],
                               "quantization": None}]},
        "runtime": {"name": "onnxruntime", "min_version": "1.17", "threads": 1,
                    "providers": ["CPUExecutionProvider"]},
        "health": {"golden": "golden.npz", "samples": 2, "atol": 1e-5, "rtol": 1e-4,
                   "min_cosine": 0.999, "min_label_agreement": 1.0},
        "budgets": {"p95_ms": 50, "peak_rss_mb": 512, "model_mb": 1},
    }
    report = b'{"note": "edgepack test vector"}'
    priv = signer._private_key
    path = write_bundle(out / "bundle" / "tiny.edgepack", manifest, TINY_MODEL,
                        {"golden.npz": golden, "report.json": report},
                        sign=lambda data: sign_bytes(data, priv))
    path.chmod(0o644)
    data = path.read_bytes()
    msg, chunks = manifest_message(path, chunk_size=TINY_CHUNK,
                                   sign=lambda b: sign_bytes(b, priv))
    import zipfile

    with zipfile.ZipFile(path) as zf:
        members = {i.filename: {"sha256": hashlib.sha256(zf.read(i)).hexdigest(),
                                "bytes": i.file_size,
                                "compression": "deflate" if i.compress_type == 8 else "stored"}
                   for i in zf.infolist()}
    table = {k: msg[k] for k in ("bundle_id", "bytes", "chunk_size", "chunks")}
    digests = {"file": "bundle/tiny.edgepack", "bundle_id": hashlib.sha256(data).hexdigest(),
               "bytes": len(data), "members": members,
               "signature_key_id": msg["signature"]["key_id"],
               "manifest_message": "bundle/tiny.manifest-message.json",
               "chunk_table_canonical": canonical_json(table).decode(),
               "chunks": len(chunks)}
    return data, msg, digests


def _fleet_pub(signer) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return signer._private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _tamper(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["signed"]["edgepack"]["deployment_id"] = "d-tampered"
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    k = {name: signer_from_seed(seed(name)) for name in KEY_NAMES}
    far = datetime.fromtimestamp(FAR, timezone.utc)
    root = create_root(root_signers=[k["root-1"], k["root-2"]], root_threshold=2,
                       release_keys=[k["release-1"].public_key],
                       online_keys=[k["online-1"].public_key], expires=far)
    root2 = rotate_root(root, signers=[k["root-1"], k["root-2"]],
                        roles={"online": ([k["online-2"].public_key], 1)}, expires=far)
    root2_bad = rotate_root(root, signers=[k["root-1"]],
                            roles={"online": ([k["online-2"].public_key], 1)}, expires=far)

    def signer(name: str, fleet: str = FLEET) -> ControlSigner:
        return ControlSigner(fleet, [k[name]], clock=lambda: float(ISSUED))

    release, online = signer("release-1"), signer("online-1")
    blob, target = _bundle()
    older = Target("0" * 63 + "1", 9000, "digits", "1.1.0")
    group = release.desired(group=GROUP, target=target, deployment_id="d-2", lifetime_s=LIFETIME,
                            version=20)
    files: dict[str, bytes] = {
        "root.json": root, "root-2.json": root2, "root-2-bad.json": root2_bad,
        "control/desired-group.json": group,
        "control/desired-device-online.json": online.desired(
            device=DEVICE, target=target, deployment_id="d-2", authorization=group,
            lifetime_s=LIFETIME, version=21),
        "control/downgrade.json": release.downgrade(device=DEVICE, target=older,
                                                    lifetime_s=LIFETIME, version=22),
        "control/job.json": online.job(device=DEVICE, job={"job_id": "prof-1", "runs": 50},
                                       targets=[target], lifetime_s=LIFETIME, version=23),
        "control/capture.json": release.capture(device=DEVICE, request={"samples": 16},
                                                lifetime_s=LIFETIME, version=24),
        "control/freshness.json": online.freshness(
            versions={f"desired/group/{GROUP}": 20}, lifetime_s=LIFETIME, version=25),
        # invalid ones
        "control/replayed-desired-group.json": release.desired(
            group=GROUP, target=older, deployment_id="d-1", lifetime_s=LIFETIME, version=19),
        "control/expired-desired-device.json": release.desired(
            device=DEVICE, target=target, deployment_id="d-3", lifetime_s=3600, version=30),
        "control/wrong-device.json": release.desired(
            device="device-2", target=target, deployment_id="d-4", lifetime_s=LIFETIME,
            version=31),
        "control/bad-signature.json": _tamper(release.desired(
            device=DEVICE, target=target, deployment_id="d-5", lifetime_s=LIFETIME,
            version=32)),
        "control/unknown-key.json": signer("stranger").desired(
            device=DEVICE, target=target, deployment_id="d-6", lifetime_s=LIFETIME,
            version=33),
        "control/wrong-role.json": online.downgrade(device=DEVICE, target=older,
                                                    lifetime_s=LIFETIME, version=34),
        "control/unauthorized-online.json": online.desired(
            device=DEVICE, target=older, deployment_id="d-7", lifetime_s=LIFETIME, version=35),
    }
    ident = DeviceIdentity(out / "identity.key", k["device-1"])
    report = {"device_id": DEVICE, "seq": 7, "kind": "installed", "ts": 1767225600.5,
              "bundle_id": target.bundle_id, "latency_ms": {"p50": 1.25, "p95": 1e-05}}
    signed_report = ident.sign(report)
    files["report/telemetry-signed.json"] = json.dumps(signed_report, sort_keys=True).encode()
    files["report/telemetry-tampered.json"] = json.dumps(
        {**signed_report, "kind": "rejected"}, sort_keys=True).encode()
    files["report/enrollment.json"] = json.dumps({DEVICE: ident.enrollment()},
                                                 sort_keys=True).encode()
    tiny, tiny_msg, tiny_digests = _tiny_bundle(out, k["release-1"])
    files["bundle/tiny.manifest-message.json"] = json.dumps(tiny_msg, indent=1,
                                                            sort_keys=True).encode()
    files["bundle/tiny.json"] = json.dumps(tiny_digests, indent=1, sort_keys=True).encode()
    files["control/desired-tiny-device.json"] = release.desired(
        device=DEVICE, target=Target(tiny_digests["bundle_id"], len(tiny), "tiny", "1.0.0"),
        deployment_id="d-tiny", lifetime_s=LIFETIME, version=40)
    files["v1/chunked.bin"] = blob
    files["v1/chunk-table.json"] = json.dumps(_chunk_table(blob, k["fleet-v1"]), indent=1,
                                              sort_keys=True).encode()
    files["v1/fleet.pub"] = _fleet_pub(k["fleet-v1"])
    files["keys.json"] = json.dumps(_keys(k), indent=1, sort_keys=True).encode()
    files["vectors.json"] = json.dumps(_index(), indent=1).encode()
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if name.endswith((".bin", ".edgepack"))
                         else data.rstrip(b"\n") + b"\n")


def _index() -> dict:
    """What each vector must do, for a device ``device-1`` in group ``group-1`` of fleet
    ``vectors`` trusting ``root.json``, checked in this order with one ledger."""
    ok, no = "accept", "refuse"
    checks = [
        ("control/desired-group.json", ok, None),
        ("control/replayed-desired-group.json", no, "replayed"),
        ("control/desired-device-online.json", ok, None),
        ("control/downgrade.json", ok, None),
        ("control/job.json", ok, None),
        ("control/capture.json", ok, None),
        ("control/freshness.json", ok, None),
        ("control/expired-desired-device.json", no, "expired"),
        ("control/wrong-device.json", no, "wrong_device"),
        ("control/bad-signature.json", no, "bad_signature"),
        ("control/unknown-key.json", no, "unknown_key"),
        ("control/wrong-role.json", no, "wrong_role"),
        ("control/unauthorized-online.json", no, "not_authorized"),
        ("control/desired-tiny-device.json", ok, None),
    ]
    return {
        "warning": WARNING,
        "device": {"device_id": DEVICE, "fleet": FLEET, "groups": [GROUP],
                   "trusted_root": "root.json"},
        "control": [{"file": f, "expect": e, "reason": r} for f, e, r in checks],
        "root_updates": [{"file": "root-2-bad.json", "expect": "refuse",
                          "reason": "threshold_not_met"},
                         {"file": "root-2.json", "expect": "accept", "reason": None}],
        "reports": [{"file": "report/telemetry-signed.json", "expect": "accept"},
                    {"file": "report/telemetry-tampered.json", "expect": "refuse",
                     "reason": "bad_signature"}],
        "v1_chunk_table": {"table": "v1/chunk-table.json", "key": "v1/fleet.pub",
                           "data": "v1/chunked.bin"},
        "bundle": {"digests": "bundle/tiny.json", "signed_by": "release-1",
                   "desired": "control/desired-tiny-device.json"},
    }


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
