"""Key rotation without touching devices, on a real Mosquitto and a real agent process:
``keys rotate --role release --publish`` → the agent walks to root v2 (event ``root_updated``
with key ids), a desired state signed by the old release key is refused (``control_refused``
naming that key), one signed by the new key installs a bundle the new key signed (the device's
agent.toml still names only the old key); then root 2-of-3 → new root keys (v3); a half-signed
v4 is refused ``threshold_not_met``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import TARGET, AgentProcess, Watcher, build_bundle

pytestmark = pytest.mark.broker

EDGEPACK = str(Path(sys.executable).with_name("edgepack"))


def _edgepack(cwd: Path, env: dict, command: str) -> str:
    """Run ``command`` in ``cwd`` exactly as docs/security.md §4.3 shows it; its stdout."""
    res = subprocess.run([EDGEPACK, *command.split()[1:]], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _key_id(keys: Path, name: str) -> str:
    return json.loads((keys / f"{name}.pub.json").read_text())["keyid"]


def test_rotate_release_then_root_on_a_live_device(tmp_path, mosquitto, fleet):
    from edgepack.agent.protocol import Topics
    from edgepack.host.fleet.client import SyncClient
    from edgepack.host.fleet.deploy import deploy
    from edgepack.host.fleet.keyring import load_signer, rotate_root
    from edgepack.host.fleet.provision import init_agent
    from edgepack.host.fleet.root_publish import root_topic
    from edgepack.host.keys import load_private_key

    env = {**os.environ, "EDGEPACK_BROKER": mosquitto.url, "EDGEPACK_FLEET": fleet}
    _edgepack(tmp_path, env, "edgepack keys init --root-keys 3 --root-threshold 2")
    keys = tmp_path / "keys"
    old_release = _key_id(keys, "release")
    setup = init_agent("x86-gateway", "dev-k", broker=mosquitto.url, target=TARGET,
                       out=tmp_path / "etc" / "agent.toml", pub=[keys / "release.pub"],
                       root=keys / "root.json", data_dir=tmp_path / "data", fleet=fleet)
    assert setup.trust_root
    old_bundle = build_bundle(tmp_path / "old.edgepack", version="1.0.0",
                              key=load_private_key(keys / "release.key"))
    agent = AgentProcess(tmp_path / "etc" / "agent.toml").start()
    try:
        with Watcher(mosquitto.url, fleet, device_id="dev-k") as w:
            w.wait_state(lambda s: s.get("online"), timeout=30)

            # release rotation: root v2, published retained; the agent walks to it
            out = _edgepack(tmp_path, env, "edgepack keys rotate --role release --publish")
            assert "root v1 -> v2" in out and old_release[:16] in out
            assert f"{Topics(fleet).prefix}root/2" in out
            ev = w.wait_event("root_updated", None, timeout=30)
            assert (ev["from_version"], ev["to_version"]) == (1, 2)
            assert ev["changed_roles"] == ["release"]
            assert set(ev["key_ids"]) == {_key_id(keys, f"root-{i}") for i in (1, 2, 3)}
            assert "release  1 of 1: release-2" in _edgepack(tmp_path, env, "edgepack keys show")
            shown = json.loads(_edgepack(tmp_path, env, "edgepack keys show --json"))
            assert shown["version"] == 2 and shown["roles"]["release"]["names"] == ["release-2"]
            assert shown["history"] == [1, 2]

            # the old release key's new desired state is refused, naming the key
            deploy(old_bundle, broker=mosquitto.url, device="dev-k", fleet=fleet,
                   key=keys / "release.key")
            ev = w.wait_event("control_refused", None, timeout=30)
            assert ev["reason"] == "unknown_key" and ev["key_ids"] == [old_release]
            assert ev["control"] == "desired"

            # the new key's is accepted, and so is a bundle only the new key signed
            new_bundle = build_bundle(tmp_path / "new.edgepack", version="1.0.1",
                                      key=load_private_key(keys / "release-2.key"))
            res = deploy(new_bundle, broker=mosquitto.url, device="dev-k", fleet=fleet,
                         key=keys / "release-2.key", wait=90)
            assert res.active
            ev = w.wait_event("verified", res.deployment_id, timeout=10)
            assert ev["key_id"]  # the bundle's signer, by key id

            # root rotation, 2 of the 3 old root keys sign with the 3 new ones: v3
            out = _edgepack(tmp_path, env, "edgepack keys rotate --role root --count 3 "
                            "--threshold 2 --root-key keys/root-1.key --root-key "
                            "keys/root-3.key --publish")
            assert "root v2 -> v3" in out and "(2 of 3)" in out
            w.wait(lambda: any(e["kind"] == "root_updated" and e["to_version"] == 3
                               for e in w.events), 30, "root v3")
            ev = [e for e in w.events if e["kind"] == "root_updated"][-1]
            assert ev["changed_roles"] == ["root"]
            assert {_key_id(keys, "root-1"), _key_id(keys, "root-3")} <= set(ev["key_ids"])
            assert _key_id(keys, "root-2") not in ev["key_ids"]
            out = _edgepack(tmp_path, env, "edgepack keys publish-root")
            assert "published root v1, v2, v3" in out

            # v4 signed by one of the new root keys only: refused, v3 stays trusted
            v3 = (keys / "root.json").read_bytes()
            half = rotate_root(v3, signers=[load_signer(keys / "root-4.key")],
                               roles={"online": ([load_signer(keys / "online.key").public_key],
                                                 1)})
            with SyncClient(mosquitto.url) as c:
                c.publish(root_topic(fleet, 4), half, retain=True)
            ev = w.wait(
                lambda: next((e for e in w.events if e["kind"] == "control_refused"
                              and e["control"] == "root"), None), 30, "root v4 refused")
            assert ev["reason"] == "threshold_not_met" and ev["version"] == 4
            assert ev["topic"] == Topics(fleet).prefix + "root/4"
    finally:
        assert agent.stop() == 0
    assert json.loads((tmp_path / "data" / "trust" / "root.json").read_text())[
        "signed"]["version"] == 3
