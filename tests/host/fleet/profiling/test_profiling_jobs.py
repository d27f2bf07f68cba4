"""Profile jobs on a real agent: refusals (signature, expiry, busy), the memory bound, the
active model left alone, and ``edgepack profile``."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import click
import pytest
from agent_helpers import Watcher, build_bundle, deploy, publish_desired, signed_desired
from click.testing import CliRunner

from edgepack.agent.bundle import read_bundle
from edgepack.agent.protocol import JobBundle, ProfileJob, Topics, encode, parse_result
from edgepack.agent.signing import canonical_json
from edgepack.agent.trust import Target
from edgepack.host.cli.profile import register
from edgepack.host.fleet.client import SyncClient
from edgepack.host.fleet.keyring import load_signer
from edgepack.host.fleet.profiling import ProfileCache, profile_on_devices
from edgepack.host.fleet.trust import sign_job
from edgepack.host.keys import load_private_key, sign_bytes

TARGET = "x86-64-vnni"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, keys) -> Path:
    return build_bundle(tmp_path_factory.mktemp("tiny") / "tiny.edgepack",
                        key=load_private_key(keys.key), target=TARGET)


def _profile(devices, bundle: Path, device: str, **kw):
    kw.setdefault("key_path", devices.keys.key)
    return profile_on_devices([bundle], [device], broker=devices.broker_url, fleet=devices.fleet,
                              runs=kw.pop("runs", 20), timeout=kw.pop("timeout", 30),
                              cache=ProfileCache(None), **kw)


def _send_raw(devices, device: str, body: dict | bytes, job_id: str | None = None,
              timeout: float = 15.0, kinds: tuple[str, ...] = ()) -> dict:
    """Publish a hand-made job; return the device's first answer to it (of ``kinds``)."""
    topics = Topics(devices.fleet)
    job_id = job_id or body["job_id"]
    with SyncClient(devices.broker_url) as c:
        c.subscribe(topics.results(device))
        c.publish(topics.jobs(device), body if isinstance(body, bytes) else encode(body), qos=1)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = c.get(left)
            if msg and msg[1]:
                m = parse_result(msg[1])
                if m["job_id"] == job_id and (not kinds or m["kind"] in kinds):
                    return m
    raise AssertionError(f"no answer to job {job_id}")


def _signed(body: dict, key: Path) -> dict:
    return {**body, "sig": sign_bytes(canonical_json(body), load_private_key(key))}


def _v2(devices, device: str, job: ProfileJob, key: Path, bundle: Path,
        lifetime_s: float = 60) -> bytes:
    """The job as a protocol v2 control message (kind ``job``) signed with ``key``."""
    body = {k: v for k, v in job.to_payload().items() if k != "eval"}
    return sign_job(load_signer(key), devices.fleet, device=device, job=body,
                    targets=[Target(read_bundle(bundle).bundle_id, read_bundle(bundle).size)],
                    lifetime_s=lifetime_s)


def test_unsigned_foreign_tampered_and_expired_jobs_are_refused(tiny, devices, keys) -> None:
    devices.start("gw-r")
    run = _profile(devices, tiny, "gw-r", key_path=None).devices["gw-r"]
    assert (run.status, run.reason) == ("refused", "signature")
    assert "not signed" in run.message
    run = _profile(devices, tiny, "gw-r", key_path=keys.other_key).devices["gw-r"]
    assert (run.status, run.reason) == ("refused", "signature")
    assert "not trusted" in run.message

    bid = read_bundle(tiny).bundle_id
    job = ProfileJob(job_id=f"j-{uuid.uuid4().hex[:8]}", deadline=int(time.time()) + 60,
                     bundles=(JobBundle(bid),), runs=5)
    # a v1 job with a valid detached signature binds no device and no version: refused
    m = _send_raw(devices, "gw-r", _signed(job.to_payload(), keys.key))
    assert (m["kind"], m["reason"]) == ("refused", "signature")
    assert "not signed as a protocol v2" in m["detail"]

    tampered = json.loads(_v2(devices, "gw-r", job, keys.key, tiny))
    tampered["signed"]["edgepack"]["job"]["runs"] = 50_000  # changed after signing
    m = _send_raw(devices, "gw-r", json.dumps(tampered).encode(), job.job_id)
    assert (m["kind"], m["reason"]) == ("refused", "signature")
    assert "does not verify" in m["detail"]

    other = _v2(devices, "gw-other", job, keys.key, tiny)  # for another device
    m = _send_raw(devices, "gw-r", other, job.job_id)
    assert (m["kind"], m["reason"]) == ("refused", "signature")
    assert "gw-other" in m["detail"]

    late = ProfileJob(job_id=f"j-{uuid.uuid4().hex[:8]}", deadline=int(time.time()) - 5,
                      bundles=(JobBundle(bid),))
    m = _send_raw(devices, "gw-r", _v2(devices, "gw-r", late, keys.key, tiny, lifetime_s=-600),
                  late.job_id)
    assert (m["kind"], m["reason"]) == ("refused", "expired")

    floats = json.loads(_v2(devices, "gw-r", replace(job, job_id="j-float"), keys.key, tiny))
    floats["signed"]["edgepack"]["job"]["runs"] = 5.0
    m = _send_raw(devices, "gw-r", json.dumps(floats).encode(), "j-float")
    assert (m["kind"], m["reason"]) == ("refused", "malformed")
    assert "float" in m["detail"]

    # A valid job still runs after all that.
    run = _profile(devices, tiny, "gw-r").devices["gw-r"]
    assert run.status == "complete", run.message


def test_busy_device_refuses_and_the_memory_bound_kills(tiny, devices, keys) -> None:
    devices.start("gw-b")
    # An install in progress: the desired bundle is not published, so it waits for it.
    missing = uuid.uuid4().hex * 2
    with Watcher(devices.broker_url, devices.fleet, "gw-b") as w:
        publish_desired(devices.broker_url, devices.fleet, missing, device_id="gw-b",
                        key=keys.key)
        w.wait_state(lambda s: s.get("phase") == "downloading")
        run = _profile(devices, tiny, "gw-b").devices["gw-b"]
        assert (run.status, run.reason) == ("refused", "busy")
        assert "install is in progress" in run.message
        with SyncClient(devices.broker_url) as c:  # clear the desired state (signed, v2)
            c.publish(Topics(devices.fleet).desired("gw-b"),
                      signed_desired(devices.fleet, None, device_id="gw-b", key=keys.key),
                      qos=1, retain=True)
        w.wait_state(lambda s: s.get("phase") == "idle", since=len(w.states))

    run = _profile(devices, tiny, "gw-b", max_rss_mb=40).devices["gw-b"]
    res = next(iter(run.results.values()))
    assert res["status"] in ("failed", "partial") and res["reason"] == "memory", res
    assert "over its bound of 40 MB" in res["detail"]
    assert run.status == "partial"


def test_profiling_leaves_the_active_bundle_alone(tiny, devices, keys, tmp_path: Path) -> None:
    proc = devices.start("gw-a")
    other = build_bundle(tmp_path / "other.edgepack", key=load_private_key(keys.key), seed=3,
                         version="2.0.0", target=TARGET)
    with Watcher(devices.broker_url, devices.fleet, "gw-a") as w:
        bid, _ = deploy(devices.broker_url, devices.fleet, tiny, key=keys.key, device_id="gw-a")
        w.wait_active(bid)
        n_states = len(w.states)
        rep = _profile(devices, other, "gw-a")
        assert rep.devices["gw-a"].status == "complete"
        time.sleep(0.5)
        assert all((s.get("active") or {}).get("bundle_id") == bid for s in w.states[n_states:])
        assert "profile job" in proc.log_text()
    data = devices.root / "gw-a" / "data"
    assert not (data / "profiling").exists(), "scratch files are removed after the job"
    slots = json.loads((data / "state.json").read_text())
    assert slots["slots"][slots["active"]]["bundle_id"] == bid


def test_edgepack_profile_cli_table_json_and_cache(tiny, devices, keys, tmp_path: Path) -> None:
    devices.start("gw-c")

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    args = ["profile", str(tiny), "--device", "gw-c", "--broker", devices.broker_url,
            "--key", str(keys.key), "--fleet", devices.fleet, "--runs", "30",
            "--cache", str(tmp_path / "cache.json")]
    res = CliRunner(env={"COLUMNS": "240"}).invoke(cli, args)
    assert res.exit_code == 0, res.output
    for col in ("load ms", "first ms", "p50 ms", "p95 ms", "p99 ms", "peak RSS", "golden",
                "top ops"):
        assert col in res.stdout
    assert "gw-c: accepted the job" in res.stderr
    assert "pass" in res.stdout

    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    r = doc["devices"]["gw-c"]["results"][0]
    assert r["cached"] is True and doc["devices"]["gw-c"]["job_id"] is None
    assert r["latency_ms"]["runs"] == 30 and r["latency_ms"]["p95"] >= r["latency_ms"]["p50"]
    assert r["golden"]["passed"] is True and r["ops"]["available"] is True

    res = CliRunner().invoke(cli, [*args, "--json", "--no-cache", "--timeout", "3",
                                   "--device", "nobody"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["devices"]["gw-c"]["status"] == "complete"
    assert doc["devices"]["nobody"]["status"] == "timeout"
    assert "never acknowledged" in doc["devices"]["nobody"]["message"]


def test_a_replayed_job_does_not_run_again_after_an_agent_restart(tiny, devices, keys) -> None:
    from edgepack.host.fleet.publish import publish_bundle

    proc = devices.start("gw-p")
    bid = read_bundle(tiny).bundle_id
    job = ProfileJob(job_id=f"j-{uuid.uuid4().hex[:8]}", deadline=int(time.time()) + 120,
                     bundles=(JobBundle(bid),), runs=3, op_profile=False)
    older = _v2(devices, "gw-p", replace(job, job_id="j-older"), keys.key, tiny, lifetime_s=120)
    payload = _v2(devices, "gw-p", job, keys.key, tiny, lifetime_s=120)
    assert json.loads(older)["signed"]["version"] < json.loads(payload)["signed"]["version"]
    publish_bundle(tiny, devices.broker_url, key_path=keys.key, fleet=devices.fleet)
    m = _send_raw(devices, "gw-p", payload, job.job_id, timeout=60, kinds=("done", "refused"))
    assert m["kind"] == "done", m

    proc.stop()  # the device forgets its in-memory job ids; the trust ledger remains
    with Watcher(devices.broker_url, devices.fleet, "gw-p") as w:
        proc.start()
        w.wait_state(lambda s: s.get("online") is True, timeout=30)
        time.sleep(0.3)
        m = _send_raw(devices, "gw-p", payload, job.job_id, kinds=("accepted", "refused"))
        assert (m["kind"], m["reason"]) == ("refused", "duplicate"), m
        assert "does not run again" in m["detail"]
        m = _send_raw(devices, "gw-p", older, "j-older", kinds=("accepted", "refused"))
        assert (m["kind"], m["reason"]) == ("refused", "replayed"), m
        ev = w.wait_event("control_refused")
        assert (ev["control"], ev["reason"]) == ("job", "replayed")
    assert proc.log_text().count(f"profile job {job.job_id}: 1 bundle") == 1


def test_results_count_only_when_the_enrolled_device_key_signed_them(
        tiny, devices, keys, tmp_path: Path) -> None:
    """With the device's enrolled key (from the fleet database), its results are verified;
    with another key enrolled for it (a forger's results look exactly like that), every message
    is dropped and counted, and nothing it says is believed."""
    from click.testing import CliRunner

    from edgepack.agent.identity import DeviceIdentity
    from edgepack.host.cli import main
    from edgepack.host.fleet.identity import inventory_keys

    devices.start("gw-v")
    real = DeviceIdentity.load(devices.root / "gw-v" / "data").enrollment("gw-v")
    ghost = DeviceIdentity.create(tmp_path / "ghost").enrollment("gw-v")

    run = _profile(devices, tiny, "gw-v", device_keys={"gw-v": real}).devices["gw-v"]
    assert run.verified and run.refused_reports == 0
    assert run.status == "complete" and len(run.results) == 1

    run = _profile(devices, tiny, "gw-v", device_keys={"gw-v": ghost},
                   timeout=5).devices["gw-v"]
    assert run.verified and run.refused_reports >= 2  # its state and its answers
    assert run.status == "timeout" and run.results == {} and not run.accepted

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    (tmp_path / "gw-v.json").write_text(json.dumps(real))
    enrolled = CliRunner().invoke(main, ["fleet", "enroll", str(tmp_path / "gw-v.json"),
                                         "--db", db, "--fleet", devices.fleet])
    assert enrolled.exit_code == 0, enrolled.output
    assert inventory_keys(db, devices.fleet, ["gw-v", "gw-x"]) == {
        "gw-v": {"keyid": real["keyid"], "key": real["key"]}}
    r = CliRunner().invoke(main, ["profile", str(tiny), "--device", "gw-v", "--broker",
                                  devices.broker_url, "--fleet", devices.fleet, "--key",
                                  str(keys.key), "--runs", "10", "--no-cache", "--db", db,
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["devices"]["gw-v"]["verified"] is True
    missing = CliRunner().invoke(main, ["profile", str(tiny), "--device", "gw-v", "--broker",
                                        devices.broker_url, "--db",
                                        f"sqlite:///{tmp_path / 'none.db'}"])
    assert missing.exit_code != 0 and "no fleet database" in missing.output
    assert "Traceback" not in missing.output
