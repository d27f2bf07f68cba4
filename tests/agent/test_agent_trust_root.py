"""Protocol v2 end to end with a fleet root: ``keys init`` → a bundle signed by the release key →
``agent init --root`` (0600) → ``deploy`` signs the desired state → the real agent installs it;
a desired state signed by the online key alone (no release authorization) is refused."""

from __future__ import annotations

import stat

import pytest
from agent_helpers import TARGET, AgentProcess, Watcher, build_bundle

from edgepack.agent.protocol import Topics

pytestmark = pytest.mark.broker


def test_fleet_root_end_to_end(tmp_path, mosquitto, fleet):
    from edgepack.agent.trust import Target
    from edgepack.host.fleet.deploy import deploy
    from edgepack.host.fleet.keyring import init_fleet_keys, load_signer
    from edgepack.host.fleet.provision import init_agent
    from edgepack.host.fleet.trust import sign_desired
    from edgepack.host.keys import load_private_key

    fk = init_fleet_keys(tmp_path / "keys", root_keys=3, root_threshold=2)
    bundle = build_bundle(tmp_path / "b.edgepack", version="1.0.0",
                          key=load_private_key(fk.release.private_path))
    setup = init_agent("x86-gateway", "dev-r", broker=mosquitto.url, target=TARGET,
                       out=tmp_path / "etc" / "agent.toml", pub=[fk.release_pem],
                       root=fk.root, data_dir=tmp_path / "data", fleet=fleet)
    for p in (setup.config, setup.trust_root):
        assert stat.S_IMODE((tmp_path / p).stat().st_mode) == 0o600, p
    agent = AgentProcess(tmp_path / "etc" / "agent.toml").start()
    try:
        with Watcher(mosquitto.url, fleet, device_id="dev-r") as w:
            w.wait_state(lambda s: s.get("online"), timeout=20)
            # the online key alone may not assign a bundle (no release authorization)
            online = sign_desired(load_signer(fk.online.private_path), fleet,
                                  target=Target("ab" * 32, 10, "tiny", "1.0.0"),
                                  deployment_id="d-online", device="dev-r")
            from edgepack.host.fleet.client import SyncClient

            with SyncClient(mosquitto.url) as c:
                c.publish(Topics(fleet).desired("dev-r"), online, retain=True)
            ev = w.wait_event("control_refused", None, timeout=20)
            assert ev["reason"] == "not_authorized" and ev["key_ids"] == [fk.online.key_id]
            res = deploy(bundle, broker=mosquitto.url, device="dev-r", fleet=fleet,
                         key=fk.release.private_path, wait=60)
            assert res.active and not any("unsigned" in x for x in res.warnings)
    finally:
        assert agent.stop() == 0
