"""Hostile input, property-based (hypothesis): the bundle reader (path traversal names, zip bombs,
huge manifests, wrong types, duplicate members), the desired-state, bundle-manifest-message and
chunk parsers, the agent's compatibility checks on the (unauthenticated) published manifest, and
device ids / group / fleet names with ``/ + #`` or that are not UTF-8.

The property is always the same: the input is accepted or refused with an EdgepackError (which
the agent turns into an event); nothing else escapes, nothing is written outside the target
directory. The end-to-end half (a live agent fed the same kinds of garbage over MQTT, one event
each) is at the bottom.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import agent_config, publish_desired
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reliability_helpers import CrashableAgent, Recorder, save_scenario, wait_for

from edgepack.agent.bundle import read_bundle
from edgepack.agent.compat import check_compat
from edgepack.agent.config import ConfigError, load_config, parse_config
from edgepack.agent.errors import EdgepackError, ProtocolError
from edgepack.agent.protocol import (
    DesiredState,
    Topics,
    check_id,
    parse_chunk_table,
    parse_desired,
)
from edgepack.agent.signing import canonical_json
from edgepack.agent.transfer import Transfer
from edgepack.host.fleet.client import SyncClient

FUZZ = settings(max_examples=int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "300")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])
SHA = "ab" * 32

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
hostile_names = st.sampled_from([
    "../evil", "../../evil", "/etc/evil", "a/../../evil", "..", ".", "a/b/c/evil", "a/",
    "..\\evil", "C:\\evil", "model.onnx/../../evil", "ok/../../../evil", "\u202eevil", "e\x00vil",
    "golden.npz", "model.onnx", "manifest.json", "signature.json", "report.json", "sub/x.bin",
])


class Count:
    """How many hostile inputs a property saw, and how many escaped as a non-EdgepackError."""

    def __init__(self, scenario, name: str) -> None:
        self.rec = scenario(name)
        self.runs = self.failures = 0

    def __call__(self, fn, *args: Any) -> Any:
        self.runs += 1
        try:
            return fn(*args)
        except EdgepackError as exc:
            return exc
        except Exception:
            self.failures += 1
            raise

    def save(self) -> None:
        self.rec.runs, self.rec.failures = self.runs, self.failures
        save_scenario(self.rec)


# --------------------------------------------------------------------------- the bundle reader
def _valid_members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _zip(members: list[tuple[str, bytes]], stored: bool = False) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                             ) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def _set_path(doc: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        doc = doc.setdefault(k, {}) if isinstance(doc.get(k), dict) else doc.setdefault(k, {})
        if not isinstance(doc, dict):
            return
    doc[path[-1]] = value


MANIFEST_PATHS = [["schema"], ["name"], ["version"], ["target"], ["model"], ["model", "file"],
                  ["model", "format"], ["model", "sha256"], ["model", "bytes"],
                  ["model", "inputs"], ["model", "outputs"], ["runtime"], ["runtime", "name"],
                  ["health"], ["health", "golden"], ["budgets"], ["files"],
                  ["budgets", "model_mb"], ["budgets", "peak_rss_mb"]]


def _read_and_extract(data: bytes) -> None:
    """Read (and, if accepted, unpack) a bundle inside a sandbox; nothing may land outside."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "in").mkdir()
        path = root / "in" / "b.edgepack"
        path.write_bytes(data)
        dest = root / "in" / "dest"
        try:
            read_bundle(path).extract(dest)
        finally:
            outside = [p for p in root.rglob("*") if p != path and dest not in (p, *p.parents)
                       and p != root / "in"]
            assert not outside, f"written outside the destination: {outside}"


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_reader(tiny_bundle, scenario, data) -> None:
    count = _counters(scenario, "fuzz: bundle reader (hypothesis)")
    members = _valid_members(tiny_bundle)
    manifest = json.loads(members["manifest.json"])
    kind = data.draw(st.sampled_from(["rename", "add", "duplicate", "wrong_type", "random_json",
                                      "bytes", "truncate", "flip"]))
    listing = list(members.items())
    if kind == "rename":  # a member (and the manifest's name for it) renamed to something hostile
        old = data.draw(st.sampled_from(["golden.npz", "report.json", "model.onnx"]))
        new = data.draw(hostile_names)
        m = copy.deepcopy(manifest)
        if old == "model.onnx":
            m["model"]["file"] = new
        else:
            m["files"][new] = m["files"].pop(old)
            if old == "golden.npz":
                m["health"]["golden"] = new
        listing = [("manifest.json", json.dumps(m).encode())] + [
            (new if n == old else n, b) for n, b in listing if n != "manifest.json"]
    elif kind == "add":
        listing.append((data.draw(hostile_names), data.draw(st.binary(max_size=64))))
    elif kind == "duplicate":
        name = data.draw(st.sampled_from(sorted(members)))
        listing.append((name, data.draw(st.binary(max_size=64))))
    elif kind == "wrong_type":
        m = copy.deepcopy(manifest)
        _set_path(m, data.draw(st.sampled_from(MANIFEST_PATHS)), data.draw(json_values))
        listing[0] = ("manifest.json", json.dumps(m).encode())
    elif kind == "random_json":
        listing[0] = ("manifest.json", json.dumps(data.draw(json_values)).encode())
    elif kind == "bytes":
        listing[0] = ("manifest.json", data.draw(st.binary(max_size=256)))
    raw = _zip(listing, stored=data.draw(st.booleans()))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    count(_read_and_extract, raw)


def test_bundle_reader_bombs_and_giants(tiny_bundle, scenario) -> None:
    count = _counters(scenario, "fuzz: bundle reader (bombs, giants, deep JSON)")
    members = _valid_members(tiny_bundle)
    manifest = json.loads(members["manifest.json"])
    bomb = dict(members)
    bomb["report.json"] = b"\0" * (64 * 1024**2)  # 64 MiB of zeros deflate to ~64 KiB
    m = copy.deepcopy(manifest)
    m["files"]["report.json"] = __import__("hashlib").sha256(bomb["report.json"]).hexdigest()
    bomb["manifest.json"] = json.dumps(m).encode()
    cases = {
        "zip bomb": _zip(list(bomb.items())),
        "huge manifest": _zip([("manifest.json", json.dumps(
            {**manifest, "pad": "x" * (2 * 1024**2)}).encode())] +
            [(n, b) for n, b in members.items() if n != "manifest.json"]),
        "deep manifest": _zip([("manifest.json", b"[" * 200_000 + b"]" * 200_000)]),
        "huge integer": _zip([("manifest.json", b'{"schema": ' + b"9" * 10_000 + b"}")]),
        "65 members": _zip([(f"m{i}", b"") for i in range(65)]),
        "empty file": b"",
        "not a zip": b"PK\x03\x04" + b"\xff" * 100,
    }
    for name, raw in cases.items():
        result = count(_read_and_extract, raw)
        assert isinstance(result, EdgepackError), f"{name} was accepted"
    count.save()


# --------------------------------------------------------------------------- wire parsers
@FUZZ
@given(payload=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={
        "deployment_id": json_values | st.text(max_size=140), "bundle_id": json_values,
        "name": json_values, "version": json_values, "allow_downgrade": json_values,
        "ts": json_values}).map(lambda d: json.dumps(d).encode())))
@example(payload=b"[" * 100_000 + b"]" * 100_000)
@example(payload=b'{"ts": ' + b"9" * 5000 + b"}")
@example(payload=b'{"deployment_id": "d/+#", "bundle_id": "' + SHA.encode() + b'", "name": "n",'
         b' "version": "1.0.0"}')
@example(payload=b"\xff\xfe{}")
def test_fuzz_desired_state(scenario, payload) -> None:
    count = _counters(scenario, "fuzz: desired-state parser (hypothesis)")
    result = count(parse_desired, payload)
    if isinstance(result, DesiredState):
        check_id(result.deployment_id, "deployment id")
        assert len(result.bundle_id) == 64


def _table(chunks: int = 3, size: int = 2500, chunk_size: int = 1000) -> dict:
    return {"bundle_id": SHA, "bytes": size, "chunk_size": chunk_size,
            "chunks": [SHA] * chunks, "manifest": {}, "signature": None, "table_sig": None}


@FUZZ
@given(payload=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from(list(_table())), json_values).map(
        lambda kv: json.dumps({**_table(), kv[0]: kv[1]}).encode())))
@example(payload=json.dumps({**_table(), "bytes": 10**18, "chunk_size": 1}).encode())
@example(payload=json.dumps({**_table(), "chunks": [SHA] * 2}).encode())
@example(payload=b'{"bundle_id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
def test_fuzz_manifest_message(scenario, payload) -> None:
    count = _counters(scenario, "fuzz: manifest message parser (hypothesis)")
    count(parse_chunk_table, payload, SHA)


@FUZZ
@given(manifest=st.one_of(json_values, st.builds(
    lambda path, value: _mutated(path, value), st.sampled_from(MANIFEST_PATHS), json_values)))
@example(manifest={"target": "x86-64-avx2", "model": [], "runtime": "onnxruntime"})
@example(manifest={"target": "x86-64-avx2", "model": {"format": "onnx"},
                   "runtime": {"name": "onnxruntime"}, "budgets": {"model_mb": "lots"}})
@example(manifest={"target": "x86-64-avx2", "model": {"format": "onnx"},
                   "runtime": {"name": "onnxruntime", "min_version": 3},
                   "budgets": {"peak_rss_mb": [1]}})
def test_fuzz_precheck_of_published_manifest(offline_agent, scenario, manifest) -> None:
    """The ``manifest`` object in the published message is not signed by ``table_sig``: the
    agent's early compatibility check must refuse garbage, not crash on it."""
    count = _counters(scenario, "fuzz: early checks of the published manifest (hypothesis)")
    desired = DesiredState("d1", SHA, "tiny", "1.0.0")
    count(check_compat, manifest if isinstance(manifest, dict) else
          {"model": manifest}, desired, offline_agent.facts)


def _mutated(path: list[str], value: Any) -> dict:
    m = {"target": "x86-64-avx2", "name": "tiny", "version": "1.0.0",
         "model": {"format": "onnx", "bytes": 100},
         "runtime": {"name": "onnxruntime", "min_version": "1.0"},
         "budgets": {"model_mb": 10, "peak_rss_mb": 100}}
    _set_path(m, path, value)
    return m


class _Link:
    def subscribe(self, topics: list[str], qos: int = 1) -> bool:
        return True

    def unsubscribe(self, topics: list[str]) -> bool:
        return True


@FUZZ
@given(suffix=st.one_of(st.text(max_size=12), st.integers(-5, 10).map(str),
                        st.just("9" * 5000), st.just("\u0661")),
       payload=st.binary(max_size=1200))
def test_fuzz_chunk_messages(tmp_path_factory, scenario, suffix, payload) -> None:
    """Whatever arrives on a chunk topic: ignored, or the transfer fails with a reason; the
    partial file never holds bytes that do not match the signed table."""
    count = _counters(scenario, "fuzz: chunk parser (hypothesis)")
    d = tmp_path_factory.mktemp("chunks")
    table = _table()
    tr = Transfer(SHA, topics=Topics("f"), directory=d, link=_Link(), keys={},
                  allow_unsigned=True, window=3, min_free_mb=0)
    tr.start(connected=True)
    tr.on_message(Topics("f").bundle_manifest(SHA), json.dumps(table).encode())
    assert tr.state == "chunks", tr.error
    count(tr.on_message, f"{Topics('f').prefix}bundles/{SHA}/chunks/{suffix}", payload)
    assert tr.stats.written == 0  # nothing matches the table's hashes
    if tr.state == "failed":
        assert isinstance(tr.error, EdgepackError) and not tr.part_path.exists()


# --------------------------------------------------------------------------- ids and names
bad_ids = st.one_of(
    st.text(min_size=1, max_size=20).map(lambda s: s + "/x"),
    st.text(max_size=10).flatmap(lambda s: st.sampled_from([s + "+", "#" + s, s + "/#"])),
    st.binary(min_size=1, max_size=16).map(lambda b: os.fsdecode(b"\xff" + b)),  # not UTF-8
    st.text(min_size=1, max_size=10).map(lambda s: "dev-" + s + "\u00e9"),
    st.just(""), st.just("x" * 129), st.just(" dev"), st.binary(max_size=8))


@FUZZ
@given(value=bad_ids, where=st.sampled_from(["device_id", "fleet", "groups"]))
def test_fuzz_ids_and_names(scenario, value, where) -> None:
    count = _counters(scenario, "fuzz: device ids / group / fleet names (hypothesis)")
    cfg = {"device_id": "dev1", "data_dir": "/tmp/x", "target": "x86-64-avx2",
           "allow_unsigned": True, where: [value] if where == "groups" else value}
    result = count(parse_config, cfg)
    assert isinstance(result, ConfigError), f"{where}={value!r} was accepted"
    for make in (Topics("f").desired, Topics("f").telemetry, Topics("f").group_desired, Topics):
        result = count(make, value)
        assert isinstance(result, ProtocolError), f"{make} accepted {value!r}"


def test_non_utf8_config_file(tmp_path, scenario) -> None:
    count = _counters(scenario, "fuzz: device ids / group / fleet names (hypothesis)")
    p = tmp_path / "agent.toml"
    p.write_bytes(b'device_id = "dev\xff\xfe"\ndata_dir = "d"\ntarget = "t"\n')
    assert isinstance(count(load_config, p), ConfigError)
    from edgepack.agent.daemon import main
    assert main(["--config", str(p)]) == 2


# --------------------------------------------------------------------------- fixtures/plumbing
_COUNTERS: dict[str, Count] = {}


def _counters(scenario, name: str) -> Count:
    if name not in _COUNTERS:
        _COUNTERS[name] = Count(scenario, name)
    return _COUNTERS[name]


@pytest.fixture(autouse=True, scope="module")
def _save_counts():
    yield
    for c in _COUNTERS.values():
        c.save()
    _COUNTERS.clear()


@pytest.fixture(scope="module")
def tiny_bundle(rel_bundles) -> Path:
    return rel_bundles.get("1.0.0")


@pytest.fixture(scope="module")
def offline_agent(tmp_path_factory, rel_keys):
    """An Agent object that never connects: its checks are called directly."""
    from edgepack.agent.daemon import Agent

    d = tmp_path_factory.mktemp("offline-agent")
    agent = Agent(load_config(agent_config(d, "mqtt://127.0.0.1:9", "f", pub=rel_keys.pub)))
    yield agent
    agent.outbox.close()
    os.close(agent._lock_fd)


# --------------------------------------------------------------------------- end to end
@pytest.mark.broker
def test_hostile_messages_to_a_live_agent(tmp_path, mosquitto, fleet, rel_bundles, rel_keys,
                                          scenario):
    """Garbage desired states and manifest messages over MQTT: the agent stays up, reports each
    one as an event, keeps its bundle, and writes nothing outside its directory."""
    rec = scenario("hostile MQTT messages to a live agent")
    from edgepack.host.fleet.publish import publish_bundle
    from edgepack.host.keys import sign_bytes

    url = mosquitto.url
    topics = Topics(fleet)
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=rel_keys.pub)
    agent = CrashableAgent(cfg)
    bid = publish_bundle(rel_bundles.get("1.0.0"), url, key_path=rel_keys.key,
                         fleet=fleet)["bundle_id"]
    before = set(tmp_path.parent.iterdir())
    desired_garbage = [b"\xff\xfe", b"[]", b"{", b"[" * 100_000 + b"]" * 100_000,
                       b'{"ts": ' + b"9" * 5000 + b"}",
                       json.dumps({"deployment_id": "d/+#", "bundle_id": SHA, "name": "n",
                                   "version": "1"}).encode(),
                       json.dumps({"deployment_id": "d1", "bundle_id": "../../etc",
                                   "name": "n", "version": "1"}).encode(),
                       json.dumps({"deployment_id": 7, "bundle_id": SHA}).encode()]

    def signed(table: dict) -> dict:
        part = {k: table[k] for k in ("bundle_id", "bytes", "chunk_size", "chunks")}
        return {**table, "table_sig": sign_bytes(canonical_json(part), rel_keys.private)}

    # manifest messages with a valid table signature (a replayed signed table) but a hostile,
    # unauthenticated "manifest" object, or not parseable at all
    manifests = [b"\x00garbage", b'{"bundle_id": 1}',
                 json.dumps(signed({**_table(), "manifest": {"target": "x86-64-avx2",
                                                             "model": [1],
                                                             "runtime": "onnxruntime"}})).encode(),
                 json.dumps(signed({**_table(), "manifest": {
                     "target": "x86-64-avx2", "model": {"format": "onnx"},
                     "runtime": {"name": "onnxruntime"},
                     "budgets": {"model_mb": "lots", "peak_rss_mb": {"x": 1}}}})).encode()]
    try:
        with Recorder(url, fleet) as w, SyncClient(url) as c:
            agent.start()
            dep = publish_desired(url, fleet, bid)
            w.wait_event("installed", dep, timeout=30)
            # protocol v2: each is refused (unsigned or malformed) and counted in telemetry;
            # events are one per topic and reason a minute, so a storm cannot flood the outbox
            for expected, payload in enumerate(desired_garbage, 1):
                c.publish(topics.desired("dev1"), payload, qos=1, retain=False)
                w.wait(lambda n=expected: any(
                    sum((m.get("control_refused") or {}).values()) >= n for m in w.telemetry),
                    10, f"a refusal counted for desired {payload[:30]!r}")
                rec.run(agent.alive)
            refusals = [e for e in w.events if e["kind"] == "control_refused"]
            assert 1 <= len(refusals) <= len({e["reason"] for e in refusals}), refusals
            assert all(e["topic"] == topics.desired("dev1") for e in refusals)
            for i, payload in enumerate(manifests):
                fake = f"{i:02x}" * 32
                if payload.startswith(b"{") and b'"bundle_id": "' + SHA.encode() in payload:
                    payload = payload.replace(SHA.encode(), fake.encode())
                    payload = json.dumps(signed(json.loads(payload))).encode()
                c.publish(topics.bundle_manifest(fake), payload, qos=1, retain=True)
                # the signed desired state names the table's size, so the hostile manifest
                # object itself is what the device has to survive
                dep = publish_desired(url, fleet, fake, length=_table()["bytes"])
                ev = w.wait(lambda d=dep: next((e for e in w.events if e.get("deployment_id") == d
                                                and e["kind"] in ("rejected", "error")), None),
                            15, f"an event for manifest message {i}")
                assert ev["kind"] == "rejected", ev
                rec.run(agent.alive)
            assert agent.alive, agent.log_text()[-2000:]
            publish_desired(url, fleet, bid)
            wait_for(lambda: (w.state or {}).get("active", {}).get("bundle_id") == bid, 10,
                     "the bundle still active")
            rec.notes.append(f"{len(desired_garbage)} desired states, {len(manifests)} "
                             "manifest messages: one event each")
            save_scenario(rec)
    except (AssertionError, TimeoutError) as exc:
        rec.run(False, note=str(exc)[:200])
        raise
    finally:
        agent.stop()
    assert set(tmp_path.parent.iterdir()) == before
