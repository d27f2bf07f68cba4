"""Test (and demo) helpers: tiny bundles, agent configs, agents as subprocesses or threads,
a watcher of a device's topics, a fault-injecting TCP proxy and an embedded amqtt broker.

Importable outside pytest (``make demo`` may use it): nothing here depends on fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.config import write_config
from edgepack.agent.mqtt import make_client, parse_broker_url
from edgepack.agent.protocol import DesiredState, Topics, encode
from edgepack.host.fleet.client import SyncClient

TARGET = "x86-64-avx2"


class Keys:
    """The fleet key pair devices trust, and a foreign one they do not.

    :func:`publish_desired` signs desired states with the fleet key of every ``Keys`` made in
    this process (devices derive their trusted root from ``fleet.pub``: protocol v2's simple
    path; signatures by keys a device does not know are ignored).
    """

    made: list[Keys] = []

    def __init__(self, root: Path) -> None:
        from edgepack.host.keys import generate_keys, load_private_key

        self.key, self.pub, self.key_id = generate_keys(root, "fleet")
        self.other_key, self.other_pub, _ = generate_keys(root, "other")
        self.private = load_private_key(self.key)
        self.other_private = load_private_key(self.other_key)
        Keys.made.append(self)

    @classmethod
    def release_keys(cls) -> list[Path]:
        return [k.key for k in cls.made]



# --------------------------------------------------------------------------- bundles
def tiny_onnx(hidden: int = 32, seed: int = 0, n_in: int = 64, n_out: int = 10) -> bytes:
    """An MLP ``x[1,64] → Relu → logits[1,10]`` plus ``label = ArgMax(logits)`` (int64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n_out]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [1])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                    (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgepack-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_bundle(out: Path, *, name: str = "tiny", version: str = "1.0.0", target: str = TARGET,
                 key: Any = None, hidden: int = 32, seed: int = 0, broken: bool = False,
                 samples: int = 8, budgets: dict | None = None) -> Path:
    """Write a signed (``key``) or unsigned bundle around :func:`tiny_onnx`.

    ``broken``: the golden outputs are wrong, so the bundle fails the health check.
    """
    import onnxruntime as ort

    from edgepack.host.build.package import npz_bytes, write_bundle
    from edgepack.host.keys import sign_bytes

    model_bytes = tiny_onnx(hidden=hidden, seed=seed)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed + 100)
    xs = rng.standard_normal((samples, 1, 64)).astype(np.float32)
    outs = [sess.run(None, {"x": xs[k]}) for k in range(samples)]
    logits = np.stack([o[0] for o in outs])
    labels = np.stack([o[1] for o in outs])
    if broken:
        logits = -logits
        labels = (labels + 1) % 10
    manifest = {
        "name": name, "version": version, "created": "2025-01-01T00:00:00Z", "target": target,
        "model": {"file": "model.onnx", "format": "onnx",
                  "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 64],
                              "quantization": None}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 10],
                               "quantization": None},
                              {"name": "label", "dtype": "int64", "shape": [1],
                               "quantization": None}]},
        "runtime": {"name": "onnxruntime", "min_version": "1.17", "threads": 1,
                    "providers": ["CPUExecutionProvider"]},
        "health": {"golden": "golden.npz", "samples": samples, "atol": 1e-4, "rtol": 1e-3,
                   "min_cosine": 0.999, "min_label_agreement": 1.0},
        "budgets": budgets or {"p95_ms": 200, "peak_rss_mb": 2048, "model_mb": 100},
    }
    golden = npz_bytes({"input_0": xs, "output_0": logits, "output_1": labels})
    report = json.dumps({"note": "test bundle"}).encode()
    sign = (lambda data: sign_bytes(data, key)) if key is not None else None
    return write_bundle(out, manifest, model_bytes, {"golden.npz": golden,
                                                     "report.json": report}, sign=sign)


# --------------------------------------------------------------------------- configs, deploys
def _socket_path(data_dir: Path) -> str:
    """``agent.sock`` in the data dir, or, when that path is too long for a Unix socket (pytest
    temp dirs under xdist workers are deep), one in a short directory of its own."""
    if len(str(data_dir / "agent.sock")) < 100:
        return "agent.sock"
    import hashlib

    short = Path(tempfile.gettempdir()) / f"ep-{hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    return str(short / "agent.sock")


def agent_config(directory: Path, broker_url: str, fleet: str, *, device_id: str = "dev1",
                 pub: Path | None = None, **overrides: Any) -> Path:
    """Write ``directory/agent.toml`` for a test agent (fast timers, small windows)."""
    directory.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict] = {
        "broker": {"url": broker_url, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0,
                   "keepalive": 10},
        "transfer": {"window": 4, "chunk_timeout_s": 5.0, "manifest_timeout_s": 5.0,
                     "min_free_mb": 1.0, "retry_s": 1.0},
        "health": {"timeout_s": 60.0, "latency_runs": 20, "warmup_runs": 2},
        "telemetry": {"interval_s": 1.0},
        "runtime": {"threads": 1},
        "serve": {"socket": _socket_path(directory / "data")},
    }
    top: dict[str, Any] = {"device_id": device_id, "board": "x86-gateway", "target": TARGET,
                           "fleet": fleet, "data_dir": str(directory / "data"),
                           "trusted_keys": [str(pub)] if pub else [],
                           "allow_unsigned": pub is None}
    for k, v in overrides.items():
        if k in sections and isinstance(v, dict):
            sections[k].update(v)
        else:
            top[k] = v
    return write_config(directory / "agent.toml", **top, **sections)


_RELEASE = object()  # publish_desired's default: sign with the release key of Keys.current


def signed_desired(fleet: str, bundle_id: str | None, *, length: int = 0,
                   device_id: str | None = "dev1", group: str | None = None,
                   name: str = "tiny", version: str = "1.0.0", deployment_id: str = "d-1",
                   key: Path | None = None) -> bytes:
    """A release-signed (protocol v2) desired state; ``bundle_id=None`` clears."""
    from edgepack.agent.trust import Target
    from edgepack.host.fleet.keyring import load_signer
    from edgepack.host.fleet.trust import sign_desired

    signers = [load_signer(k) for k in ([key] if key else Keys.release_keys())]
    target = Target(bundle_id, length, name, version) if bundle_id else None
    return sign_desired(signers, fleet, target=target,
                        deployment_id=deployment_id if bundle_id else None,
                        device=None if group else (device_id or "dev1"), group=group)


def published_length(broker_url: str, fleet: str, bundle_id: str) -> int:
    """The ``bytes`` of a published bundle's chunk table (0 when it is not published)."""
    topic = Topics(fleet).bundle_manifest(bundle_id)
    with SyncClient(broker_url) as c:
        raw = c.retained(topic, settle=0.3).get(topic)
    try:
        n = json.loads(raw)["bytes"] if raw else 0
    except (ValueError, KeyError, TypeError):  # hostile tests publish garbage tables
        return 0
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def publish_desired(broker_url: str, fleet: str, bundle_id: str, *, device_id: str | None = "dev1",
                    group: str | None = None, name: str = "tiny", version: str = "1.0.0",
                    allow_downgrade: bool = False, deployment_id: str | None = None,
                    key: Any = _RELEASE, length: int | None = None) -> str:
    """Write the retained desired state (what ``edgepack deploy`` does); returns the deployment id.

    Signed (protocol v2) with ``key`` (default: the fleet keys of :class:`Keys`);
    ``key=None`` writes a v1 unsigned one (devices with ``allow_unsigned`` only).
    ``allow_downgrade`` also publishes a release-signed downgrade authorization for the device.
    """
    dep = deployment_id or f"d-{uuid.uuid4().hex[:10]}"
    topics = Topics(fleet)
    device = device_id or "dev1"
    topic = topics.group_desired(group) if group else topics.desired(device)
    if key is _RELEASE:
        key = False if Keys.made else None  # False: every Keys' fleet key
    if key is None:
        ds = DesiredState(deployment_id=dep, bundle_id=bundle_id, name=name, version=version,
                          allow_downgrade=allow_downgrade)
        payload = encode(ds.to_payload())
    else:
        if length is None:
            length = published_length(broker_url, fleet, bundle_id)
        payload = signed_desired(fleet, bundle_id, length=length, device_id=device, group=group,
                                 name=name, version=version, deployment_id=dep, key=key)
    with SyncClient(broker_url) as c:
        if key is not None and allow_downgrade and not group:
            c.publish(topics.downgrade(device), signed_downgrade(
                fleet, device, bundle_id, length or 0, name, version, key=key), qos=1,
                retain=True)
        c.publish(topic, payload, qos=1, retain=True)
    return dep


def signed_downgrade(fleet: str, device_id: str, bundle_id: str, length: int, name: str,
                     version: str, *, key: Path | None = None) -> bytes:
    """A release-signed downgrade authorization for ``device_id`` to run that bundle."""
    from edgepack.agent.trust import Target
    from edgepack.host.fleet.keyring import load_signer
    from edgepack.host.fleet.trust import sign_downgrade

    signers = [load_signer(k) for k in ([key] if key else Keys.release_keys())]
    return sign_downgrade(signers, fleet, device=device_id,
                          target=Target(bundle_id, length, name, version))


def deploy(broker_url: str, fleet: str, bundle: Path, *, key: Path | None, device_id: str = "dev1",
           chunk_size: int | None = 4096, allow_downgrade: bool = False) -> tuple[str, str]:
    """Publish ``bundle`` and point the device at it; returns ``(bundle_id, deployment_id)``.

    ``key`` signs the chunk table and the desired state (without it: the fleet keys of
    :class:`Keys`)."""
    from edgepack.agent.bundle import read_bundle
    from edgepack.host.fleet.publish import publish_bundle

    b = read_bundle(bundle)
    publish_bundle(bundle, broker_url, key_path=key, fleet=fleet, chunk_size=chunk_size)
    dep = publish_desired(broker_url, fleet, b.bundle_id, device_id=device_id, name=b.name,
                          version=b.version, allow_downgrade=allow_downgrade,
                          length=bundle.stat().st_size,
                          key=key if key is not None else _RELEASE)
    return b.bundle_id, dep


# --------------------------------------------------------------------------- agents
class AgentProcess:
    """``python -m edgepack.agent.daemon --config CFG`` as a real process (kill -9 works)."""

    def __init__(self, config: Path, log: Path | None = None) -> None:
        self.config = Path(config)
        self.log = log or self.config.with_name("agent.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgepack.agent.daemon", "--config", str(self.config),
                 "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class AgentThread:
    """An :class:`edgepack.agent.daemon.Agent` running in a thread of this process."""

    def __init__(self, config: Path) -> None:
        from edgepack.agent.config import load_config
        from edgepack.agent.daemon import Agent

        self.agent = Agent(load_config(config))
        self.thread = threading.Thread(target=self.agent.run, name="test-agent", daemon=True)

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.agent.request_stop()
        self.thread.join(timeout)


class Watcher:
    """Subscribes to one device's state, events and telemetry (resubscribing on reconnect)."""

    def __init__(self, broker_url: str, fleet: str, device_id: str = "dev1") -> None:
        self.topics = Topics(fleet)
        self.device_id = device_id
        self.cfg = parse_broker_url(broker_url)
        self.events: list[dict] = []
        self.telemetry: list[dict] = []
        self.states: list[dict] = []
        self._cond = threading.Condition()
        self._client = make_client(self.cfg, f"watch-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)
        self._connected = threading.Event()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(self.topics.device(self.device_id, "#"), 1)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if not msg.payload:
            return
        doc = json.loads(msg.payload)
        leaf = msg.topic.rsplit("/", 1)[1]
        with self._cond:
            {"events": self.events, "telemetry": self.telemetry,
             "state": self.states}.get(leaf, []).append(doc)
            self._cond.notify_all()

    def __enter__(self) -> Watcher:
        self._client.connect(self.cfg.host, self.cfg.port, keepalive=10)
        self._client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("watcher could not connect")
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what or predicate}; events: "
                                       f"{[(e['kind'], e.get('detail')) for e in self.events]}")
                self._cond.wait(min(left, 0.2))

    def wait_event(self, kind: str, deployment_id: str | None = None, timeout: float = 30.0
                   ) -> dict:
        def find() -> dict | None:
            for e in self.events:
                if e["kind"] == kind and (deployment_id is None
                                          or e.get("deployment_id") == deployment_id):
                    return e
            return None

        return self.wait(find, timeout, f"event {kind} ({deployment_id})")

    def kinds(self, deployment_id: str | None = None) -> list[str]:
        with self._cond:
            return [e["kind"] for e in self.events
                    if deployment_id is None or e.get("deployment_id") == deployment_id]

    def wait_state(self, predicate: Callable[[dict], bool], timeout: float = 30.0,
                   since: int = 0) -> dict:
        """The newest state message (among those after the first ``since``) that matches."""
        return self.wait(lambda: next((s for s in reversed(self.states[since:])
                                       if predicate(s)), None), timeout, "state")

    def wait_active(self, bundle_id: str, timeout: float = 30.0) -> dict:
        return self.wait_state(lambda s: s.get("online") and (s.get("active") or {}).get(
            "bundle_id") == bundle_id, timeout)

    @property
    def state(self) -> dict | None:
        with self._cond:
            return self.states[-1] if self.states else None


# --------------------------------------------------------------------------- faults
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpProxy:
    """A loopback TCP proxy that can cut every connection, refuse new ones and cap bandwidth
    from the broker to the client (the kernel here has no netem)."""

    def __init__(self, upstream_port: int, *, rate_bytes_s: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.rate = rate_bytes_s
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._refuse = False
        self._stop = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.rate),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self, refuse: bool = True) -> None:
        """Drop every connection (and refuse new ones until :meth:`restore`)."""
        self._refuse = refuse
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._refuse = False

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()


class AmqttBroker:
    """amqtt's broker in a thread with its own asyncio loop, on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> AmqttBroker:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}",
                                      "max_connections": 100}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True},
            "topic-check": {"enabled": False},
        }
        self._thread.start()

        async def _start() -> None:
            self._broker = Broker(config, loop=self._loop)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(20)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
