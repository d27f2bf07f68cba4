"""``deploy --group G`` warns (stderr and ``--json``) about devices of G whose own desired state
overrides the group's, naming them and the command that clears it; ``fleet clear --device``
hands the device back to the group and the warning goes away; ``fleet clear --group`` clears
the group's own desired state with a signed clear."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.agent.protocol import Topics, encode, parse_desired
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.deploy import clear_desired, deploy

pytestmark = pytest.mark.broker

EDGEPACK = str(Path(sys.executable).with_name("edgepack"))


def _run(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([EDGEPACK, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_group_deploy_names_devices_that_override_it(tmp_path, mosquitto, fleet, make_bundle,
                                                     signing_key):
    topics = Topics(fleet)
    with SyncClient(mosquitto.url) as c:
        for dev, groups in (("dev-a", ["lab"]), ("dev-b", ["lab", "x"]), ("dev-c", ["other"])):
            c.publish(topics.state(dev), encode({"online": True, "device_id": dev,
                                                 "groups": groups}), retain=True)
    bundle = make_bundle(version="1.0.0")
    key = signing_key[0]
    for dev in ("dev-a", "dev-b", "dev-c"):
        deploy(bundle, broker=mosquitto.url, device=dev, fleet=fleet, key=key)
    clear_desired(broker=mosquitto.url, device="dev-b", fleet=fleet, key=key)  # signed clear

    (tmp_path / "keys").mkdir()
    shutil.copy(key, tmp_path / "keys" / "fleet.key")
    os.chmod(tmp_path / "keys" / "fleet.key", 0o600)
    shutil.copy(bundle, tmp_path / "tiny.edgepack")
    env = {**os.environ, "EDGEPACK_BROKER": mosquitto.url, "EDGEPACK_FLEET": fleet}
    res = _run(tmp_path, env, "deploy", "tiny.edgepack", "--group", "lab", "--json")
    out = json.loads(res.stdout)
    assert out["overridden"] == ["dev-a"]
    assert any("dev-a" in w and "override" in w for w in out["warnings"])
    assert "edgepack fleet clear --device dev-a" in res.stderr

    _run(tmp_path, env, "fleet", "clear", "--device", "dev-a")
    res = _run(tmp_path, env, "deploy", "tiny.edgepack", "--group", "lab")
    assert "override" not in res.stderr and "deployed" in res.stdout
    res = _run(tmp_path, env, "deploy", "tiny.edgepack", "--group", "lab", "--json")
    assert json.loads(res.stdout)["overridden"] == []

    # the group's own desired state is cleared the same way: a signed clear naming no bundle
    res = _run(tmp_path, env, "fleet", "clear", "--group", "lab")
    assert "cleared" in res.stdout and "unsigned" not in res.stdout
    with SyncClient(mosquitto.url) as c:
        raw = c.retained(topics.group_desired("lab"))[topics.group_desired("lab")]
    assert json.loads(raw)["signatures"] and parse_desired(raw) is None
