"""``rotate_keys`` writes root N+1 next to root N (the chain devices walk), ``describe_root``
reads it back, and a device several rotations behind walks the chain whatever order the
retained versions arrive in."""

from __future__ import annotations

import json

import pytest

from edgepack.agent.trust import KeyFileError, RootRefused, TrustedRoot
from edgepack.agent.trust.root import RootChain
from edgepack.host.fleet.keyring import (
    describe_root,
    init_fleet_keys,
    load_signer,
    root_history,
    rotate_keys,
)


@pytest.fixture
def keys(tmp_path):
    init_fleet_keys(tmp_path / "keys", root_keys=3, root_threshold=2)
    return tmp_path / "keys"


def test_rotations_make_a_chain_a_late_device_walks_in_any_order(keys, tmp_path):
    device = TrustedRoot.install(tmp_path / "dev" / "root.json", (keys / "1.root.json")
                                 .read_bytes())
    rel = rotate_keys(keys, "release")
    onl = rotate_keys(keys, "online", count=2, threshold=2)
    root = rotate_keys(keys, "root", count=3, threshold=2,
                       root_keys=[keys / "root-2.key", keys / "root-3.key"])
    assert [r.to_version for r in (rel, onl, root)] == [2, 3, 4]
    assert rel.pem == keys / "release-2.pub" and rel.pem.exists()
    assert [v for v, _ in root_history(keys)] == [1, 2, 3, 4]
    info = describe_root(keys)
    roles = {r.role: r for r in info.roles}
    assert info.version == 4 and info.history == (1, 2, 3, 4)
    assert roles["root"].names == ("root-4", "root-5", "root-6")
    assert roles["root"].threshold == 2
    assert roles["online"].names == ("online-2", "online-3") and roles["online"].threshold == 2
    assert roles["release"].key_ids == (rel.new_keys[0].key_id,)
    assert {s[:16] for s in info.signed_by} >= {k.key_id[:16] for k in root.new_keys}
    assert json.loads(json.dumps(info.to_json()))["roles"]["release"]["names"] == ["release-2"]

    chain = RootChain(device, device.update)
    applied = []
    for v in (4, 2, 1, 3):  # retained messages arrive in any order; old ones are ignored
        done, refused = chain.offer((keys / f"{v}.root.json").read_bytes())
        assert refused is None
        applied += [u.to_version for u in done]
    assert applied == [2, 3, 4] and device.version == 4
    assert TrustedRoot.load(tmp_path / "dev" / "root.json").version == 4


def test_rotation_needs_the_current_root_threshold(keys):
    with pytest.raises(KeyFileError) as info:
        rotate_keys(keys, "release", root_keys=[keys / "root-1.key"])
    assert "needs 2 of its root keys" in str(info.value) and "`root_keys=`" in str(info.value)
    with pytest.raises(KeyFileError):
        rotate_keys(keys, "release", root_keys=[keys / "release.key", keys / "root-1.key"])
    assert describe_root(keys).version == 1  # nothing written


def test_a_refused_version_stops_the_walk(keys, tmp_path):
    from edgepack.host.fleet.keyring import rotate_root

    device = TrustedRoot.install(tmp_path / "root.json", (keys / "root.json").read_bytes())
    rotate_keys(keys, "online")
    half = rotate_root((keys / "2.root.json").read_bytes(),
                       signers=[load_signer(keys / "root-1.key")], roles={})
    chain = RootChain(device, device.update)
    done, refused = chain.offer((keys / "2.root.json").read_bytes())
    assert [u.to_version for u in done] == [2] and refused is None
    done, refused = chain.offer(half)
    assert done == () and isinstance(refused, RootRefused)
    assert refused.reason == "threshold_not_met" and device.version == 2
    _, refused = chain.offer(b"{not json")
    assert refused.reason == "malformed"
