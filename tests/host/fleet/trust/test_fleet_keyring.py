"""Keys on disk (0600), roots with thresholds, and control signers whose versions only go up."""

from __future__ import annotations

import json
import os
import stat

import pytest

from edgepack.agent.trust import KeyFileError, Target, parse_control
from edgepack.host.fleet.keyring import (
    create_root,
    generate_key,
    load_public_key,
    load_signer,
    rotate_root,
)
from edgepack.host.fleet.trust import ControlSigner


def test_generated_keys_are_0600_and_load_back(tmp_path):
    info = generate_key(tmp_path, "release-1")
    assert stat.S_IMODE(info.private_path.stat().st_mode) == 0o600
    assert load_signer(info.private_path).public_key.keyid == info.key_id
    assert load_public_key(info.public_path).keyid == info.key_id
    with pytest.raises(KeyFileError):
        generate_key(tmp_path, "release-1")


def test_key_readable_by_others_is_refused(tmp_path):
    info = generate_key(tmp_path, "online")
    os.chmod(info.private_path, 0o640)
    with pytest.raises(KeyFileError) as info_err:
        load_signer(info.private_path)
    assert "0640" in str(info_err.value)


def test_public_key_is_not_a_signing_key(tmp_path):
    info = generate_key(tmp_path, "k")
    os.chmod(info.public_path, 0o600)
    with pytest.raises(KeyFileError):
        load_signer(info.public_path)


def test_root_threshold_must_fit_its_keys(tmp_path):
    signers = [load_signer(generate_key(tmp_path, f"root-{i}").private_path) for i in range(3)]
    rel = load_public_key(generate_key(tmp_path, "rel").public_path)
    onl = load_public_key(generate_key(tmp_path, "onl").public_path)
    with pytest.raises(KeyFileError):
        create_root(root_signers=signers, root_threshold=4, release_keys=[rel],
                    online_keys=[onl])
    root = json.loads(create_root(root_signers=signers, root_threshold=2, release_keys=[rel],
                                  online_keys=[onl]))
    roles = root["signed"]["roles"]
    assert roles["root"]["threshold"] == 2 and len(roles["root"]["keyids"]) == 3
    assert roles["targets"]["keyids"] == [rel.keyid]
    assert roles["timestamp"]["keyids"] == roles["snapshot"]["keyids"] == [onl.keyid]
    v2 = json.loads(rotate_root(json.dumps(root).encode(), signers=signers,
                                roles={"online": ([rel], 1)}))
    assert v2["signed"]["version"] == 2 and v2["signed"]["roles"]["timestamp"]["keyids"] == [
        rel.keyid]


def test_versions_only_go_up_across_signer_restarts(tmp_path):
    signer = load_signer(generate_key(tmp_path, "onl").private_path)
    state = tmp_path / "versions.json"
    clock = [1000.0]
    a = ControlSigner("f", [signer], state_path=state, clock=lambda: clock[0])
    v1 = parse_control(a.freshness(versions={})).version
    v2 = parse_control(a.freshness(versions={})).version
    clock[0] = 10.0  # the clock jumps backwards; a restarted server still goes up
    b = ControlSigner("f", [signer], state_path=state, clock=lambda: clock[0])
    v3 = parse_control(b.freshness(versions={})).version
    assert v1 < v2 < v3


def test_signed_message_names_target_hash_and_length(tmp_path):
    signer = load_signer(generate_key(tmp_path, "rel").private_path)
    msg = parse_control(ControlSigner("f", [signer]).desired(
        group="g", target=Target("ab" * 32, 42, "m", "1.0.0"), deployment_id="d"))
    assert msg.target == Target("ab" * 32, 42, "m", "1.0.0")
    assert (msg.kind, msg.scope, msg.subject, msg.fields["deployment_id"]) == (
        "desired", "group", "g", "d")


def test_offline_ceremony_collects_root_signatures_one_by_one(tmp_path):
    from edgepack.agent.trust import TrustedRoot
    from edgepack.host.fleet.keyring import add_signature

    roots = [load_signer(generate_key(tmp_path, f"root-{i}").private_path) for i in range(3)]
    rel = load_public_key(generate_key(tmp_path, "rel").public_path)
    first = create_root(root_signers=roots[:1], root_threshold=2, release_keys=[rel],
                        online_keys=[rel], root_keys=[r.public_key for r in roots])
    with pytest.raises(Exception) as info:
        TrustedRoot.install(tmp_path / "dev" / "root.json", first)
    assert info.value.reason == "threshold_not_met"
    both = add_signature(first, roots[2])
    assert TrustedRoot.install(tmp_path / "dev" / "root.json", both).version == 1
