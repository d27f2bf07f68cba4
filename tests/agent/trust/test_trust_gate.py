"""Where a device's trusted root comes from (``DesiredGate``/``open_root``): derived from the
trusted keys, following agent.toml when they change, replaced by the fleet's root once named,
which then stays (rotations land there); v1 desired states only in development mode."""

from __future__ import annotations

import json

import pytest

from edgepack.agent.protocol import DesiredState, encode
from edgepack.agent.trust import ControlRefused
from edgepack.agent.trust.gate import DesiredGate, open_root


def _keys(json_path):
    return sorted(json.loads(json_path.read_bytes())["signed"]["keys"])


def test_root_derived_then_followed_then_replaced(tmp_path):
    from edgepack.host.fleet.keyring import init_fleet_keys
    from edgepack.host.keys import generate_keys

    _, pub1, _ = generate_keys(tmp_path / "k", "one")
    _, pub2, _ = generate_keys(tmp_path / "k", "two")
    trust = tmp_path / "trust"
    assert open_root(trust, trusted_keys=[str(pub1)])
    first = _keys(trust / "root.json")
    assert open_root(trust, trusted_keys=[str(pub2)])
    assert _keys(trust / "root.json") != first and len(first) == 1
    fk = init_fleet_keys(tmp_path / "fleet")
    assert open_root(trust, root_file=str(fk.root), trusted_keys=[str(fk.release_pem)])
    fleet_root = (trust / "root.json").read_bytes()
    assert fleet_root == fk.root.read_bytes()
    assert open_root(trust, trusted_keys=[str(pub1)])  # a fleet root is never re-derived
    assert (trust / "root.json").read_bytes() == fleet_root
    assert not open_root(tmp_path / "none")


def test_v1_desired_only_in_development_mode(tmp_path):
    from edgepack.host.keys import generate_keys

    _, pub, _ = generate_keys(tmp_path / "k", "fleet")
    v1 = encode(DesiredState("d-1", "ab" * 32, "tiny", "1.0.0").to_payload())
    strict = DesiredGate(tmp_path / "a", device_id="dev1", fleet="f", trusted_keys=[str(pub)])
    with pytest.raises(ControlRefused) as err:
        strict.desired(v1)
    assert err.value.reason == "unsigned"
    with pytest.raises(ControlRefused):
        strict.desired(b"")  # clearing is a signed message too
    dev = DesiredGate(tmp_path / "b", device_id="dev1", fleet="f", trusted_keys=[str(pub)],
                      allow_unsigned=True)
    assert dev.desired(v1).bundle_id == "ab" * 32 and dev.desired(b"") is None
