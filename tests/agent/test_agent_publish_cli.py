"""``publish_bundle`` against a real broker, and the ``agent init`` / ``publish`` commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgepack.agent.bundle import read_bundle
from edgepack.agent.config import load_config
from edgepack.agent.protocol import Topics, parse_chunk_table
from edgepack.agent.signing import canonical_json, load_public_keys, verify_detached
from edgepack.host.cli import main
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.publish import publish_bundle

pytestmark = pytest.mark.broker


def test_publish_retains_chunks_and_a_signed_table(mosquitto, fleet, bundles, keys):
    path = bundles.get("1.0.0")
    b = read_bundle(path)
    r = publish_bundle(path, mosquitto.url, key_path=keys.key, fleet=fleet, chunk_size=4096)
    assert not r["skipped"] and r["signed"] and r["key_id"] == keys.key_id
    assert r["chunks"] == -(-b.size // 4096) and r["bundle_id"] == b.bundle_id
    t = Topics(fleet)
    with SyncClient(mosquitto.url) as c:
        retained = c.retained(f"{t.prefix}bundles/#")
    table = parse_chunk_table(retained[t.bundle_manifest(b.bundle_id)], b.bundle_id)
    assert table.manifest == b.manifest and table.signature == b.signature
    verify_detached(canonical_json(table.signed_part()), table.table_sig,
                    load_public_keys([keys.pub]), what="chunk table")
    data = b"".join(retained[t.bundle_chunk(b.bundle_id, i)] for i in range(r["chunks"]))
    assert data == path.read_bytes()

    again = publish_bundle(path, mosquitto.url, key_path=keys.key, fleet=fleet, chunk_size=4096)
    assert again["skipped"]
    # a different chunk size republishes, and clears chunks the old table had beyond the new one
    bigger = publish_bundle(path, mosquitto.url, key_path=keys.key, fleet=fleet,
                            chunk_size=8192)
    assert not bigger["skipped"]
    with SyncClient(mosquitto.url) as c:
        chunks = [k for k in c.retained(f"{t.prefix}bundles/{b.bundle_id}/chunks/#")]
    assert len(chunks) == bigger["chunks"]


def test_agent_init_writes_a_config_that_loads(tmp_path, keys):
    out = tmp_path / "etc" / "agent.toml"
    res = CliRunner().invoke(main, [
        "agent", "init", "--board", "rpi4", "--device-id", "pi-kitchen",
        "--broker", "mqtt://broker.local:1883", "--pub", str(keys.pub),
        "--data-dir", str(tmp_path / "var"), "--out", str(out), "--group", "kitchen",
        "--fleet", "home", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    cfg = load_config(out)
    assert doc["config"] == str(out) and cfg.device_id == "pi-kitchen"
    assert cfg.board == "rpi4" and cfg.target == "rpi4" and cfg.fleet == "home"
    assert cfg.groups == ("kitchen",) and not cfg.broker_config().tls and not cfg.broker.ca
    assert cfg.trusted_keys == (str(tmp_path / "etc" / "keys" / "fleet.pub"),)
    assert (tmp_path / "etc" / "keys" / "fleet.pub").read_bytes() == keys.pub.read_bytes()
    assert cfg.runtime.threads == 4  # the board's defaults are kept

    res = CliRunner().invoke(main, ["agent", "init", "--board", "rpi4", "--device-id", "x",
                                    "--broker", "mqtt://b", "--pub", str(keys.pub),
                                    "--out", str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    res = CliRunner().invoke(main, ["agent", "init", "--board", "x86-gateway", "--device-id",
                                    "gw", "--broker", "mqtt://b", "--out", str(out), "--force",
                                    "--data-dir", str(tmp_path), "--target", "nope",
                                    "--allow-unsigned"])
    assert res.exit_code == 1 and "unknown target 'nope'" in res.output
    res = CliRunner().invoke(main, ["agent", "init", "--board", "esp8266", "--device-id", "x",
                                    "--broker", "mqtt://b"])
    assert res.exit_code == 2 and "rpi-zero-2w" in res.output


def test_publish_command(mosquitto, fleet, bundles, keys):
    path = bundles.get("1.0.0")
    args = ["publish", str(path), "--broker", mosquitto.url, "--key", str(keys.key),
            "--fleet", fleet]
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["bundle_id"] == read_bundle(path).bundle_id and doc["chunk_size"] == 256 * 1024
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "already published" in res.output
    res = CliRunner().invoke(main, ["publish", str(path), "--broker", "mqtt://127.0.0.1:1",
                                    "--fleet", fleet])
    assert res.exit_code == 1 and res.output.startswith("error: cannot reach the broker")
