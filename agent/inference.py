"""Inference for applications on the device: a Python API and a local endpoint.

In-process::

    from edgepack.agent.inference import Model
    model = Model.active("/var/lib/edgepack")          # the agent's committed bundle
    outputs = model.predict({"input": x})               # {output name: np.ndarray}

Through the running agent (every call is timed into the agent's telemetry)::

    from edgepack.agent.inference import Client
    client = Client("unix:/var/lib/edgepack/agent.sock")   # or "http://127.0.0.1:8765"
    outputs = client.predict({"input": x})

The endpoint speaks HTTP/1.1 on a Unix socket and/or a loopback TCP port:

* ``GET /v1/model`` — bundle id, name, version, runtime, inputs and outputs;
* ``GET /v1/health`` — ``{"ok": true, "bundle_id": ...}`` (503 when no bundle is active);
* ``POST /v1/predict`` — inputs as JSON ``{"inputs": {name: nested list | {"dtype", "shape",
  "b64"}}}``, as ``application/x-npz`` (one array per input name) or, for a one-input model, as
  ``application/x-npy``. The answer is JSON ``{"outputs": {name: nested list}, "dtypes",
  "shapes", "latency_ms", "bundle_id"}``, or ``application/x-npz`` when the request was
  npy/npz or sent ``Accept: application/x-npz``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, EdgepackError, InstallError
from edgepack.agent.installer import read_state
from edgepack.agent.runtimes import FORMAT_RUNTIME, Session, TensorSpec, open_model
from edgepack.agent.telemetry import LatencyStats

__all__ = [
    "Model",
    "InferenceService",
    "InferenceServer",
    "Client",
    "NoModelError",
    "active_slot_dir",
]

MAX_BODY = 256 * 1024 * 1024
NPZ = "application/x-npz"
NPY = "application/x-npy"


class NoModelError(EdgepackError):
    """No bundle is active yet: deploy one first."""


def _spec_from_manifest(t: Mapping[str, Any], fallback: TensorSpec | None) -> TensorSpec:
    q = t.get("quantization") or {}
    return TensorSpec(name=t["name"], dtype=str(t.get("dtype") or (fallback.dtype if fallback
                                                                    else "float32")),
                      shape=tuple(t.get("shape") or (fallback.shape if fallback else ())),
                      scale=float(q.get("scale") or 0.0), zero_point=int(q.get("zero_point") or 0))


STRING_DTYPES = ("string", "str")


def _np_dtype(dtype: str) -> np.dtype | None:
    """The numpy dtype feeds are converted to (``str`` for string tensors); None: left alone."""
    if dtype in STRING_DTYPES:
        return np.dtype(str)
    if dtype in ("sequence", "map"):
        return None
    return np.dtype(dtype)


def _plain_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """String tensors as numpy str arrays (the runtime gives object arrays, which npz refuses)."""
    return {k: v.astype(str) if isinstance(v, np.ndarray) and v.dtype.kind == "O" else v
            for k, v in outputs.items()}


def active_slot_dir(data_dir: str | os.PathLike) -> Path:
    """The directory of the agent's committed bundle under ``data_dir``."""
    try:
        state = read_state(data_dir)
    except InstallError:
        raise NoModelError(f"no agent state in {data_dir}: is the agent installed there and has "
                           "a bundle been deployed?") from None
    if state.active is None:
        raise NoModelError(f"no bundle is active on this device yet ({data_dir}/state.json)")
    return Path(data_dir) / "slots" / state.active.slot


class Model:
    """A loaded bundle ready to predict. Every call is timed into ``stats``."""

    def __init__(self, session: Session, manifest: Mapping[str, Any], *, bundle_id: str = "",
                 path: Path | None = None, stats: LatencyStats | None = None) -> None:
        self.session = session
        self.manifest = dict(manifest)
        self.bundle_id = bundle_id
        self.path = path
        self.stats = stats if stats is not None else LatencyStats()
        m = self.manifest.get("model", {})
        by_name = {s.name: s for s in session.inputs}
        self.inputs = [_spec_from_manifest(t, by_name.get(t["name"])) for t in m.get("inputs", [])
                       ] or list(session.inputs)
        out_by_name = {s.name: s for s in session.outputs}
        self.outputs = [_spec_from_manifest(t, out_by_name.get(t["name"]))
                        for t in m.get("outputs", [])] or list(session.outputs)
        if [s.name for s in self.inputs] != [s.name for s in session.inputs]:
            self.inputs = list(session.inputs)  # the model itself is the authority on names
        if len(self.outputs) != len(session.outputs):
            self.outputs = list(session.outputs)
        self._output_names = [s.name for s in self.outputs]
        self._dtypes = {s.name: _np_dtype(s.dtype) for s in self.inputs}
        self.drift: Any = None  # a DriftSketcher when the bundle has drift.json (the daemon's)
        self.capture: Any = None  # the agent's sampled capture (agent/capture.py), off by default

    # ---- construction
    @classmethod
    def open(cls, path: str | os.PathLike, *, threads: int = 0, stats: LatencyStats | None = None,
             warmup: int = 1) -> Model:
        """Load an installed slot directory or a ``.edgepack`` file (hash-checked)."""
        path = Path(path)
        if path.is_file():
            from edgepack.agent.bundle import read_bundle

            bundle = read_bundle(path)
            tmp = Path(tempfile.mkdtemp(prefix="edgepack-model-"))
            bundle.extract(tmp)
            return cls._from_dir(tmp, bundle_id=bundle.bundle_id, threads=threads, stats=stats,
                                 warmup=warmup)
        return cls._from_dir(path, bundle_id=None, threads=threads, stats=stats, warmup=warmup)

    @classmethod
    def active(cls, data_dir: str | os.PathLike, *, threads: int = 0,
               stats: LatencyStats | None = None) -> Model:
        """The bundle the agent under ``data_dir`` has committed."""
        return cls.open(active_slot_dir(data_dir), threads=threads, stats=stats)

    @classmethod
    def _from_dir(cls, d: Path, *, bundle_id: str | None, threads: int,
                  stats: LatencyStats | None, warmup: int) -> Model:
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(f"{d} holds no readable manifest.json ({exc})") from None
        if bundle_id is None:
            try:
                bundle_id = json.loads((d / "slot.json").read_text()).get("bundle_id", "")
            except (OSError, ValueError):
                bundle_id = ""
        runtime = manifest.get("runtime", {}).get("name") or FORMAT_RUNTIME.get(
            manifest["model"]["format"], "")
        threads = threads or int(manifest.get("runtime", {}).get("threads") or 0)
        session = open_model(d / manifest["model"]["file"], runtime, threads=threads,
                             providers=tuple(manifest.get("runtime", {}).get("providers") or ()))
        model = cls(session, manifest, bundle_id=bundle_id or "", path=d, stats=stats)
        model.warmup(warmup)
        return model

    # ---- metadata
    @property
    def name(self) -> str:
        return self.manifest.get("name", "")

    @property
    def version(self) -> str:
        return self.manifest.get("version", "")

    def describe(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "name": self.name, "version": self.version,
                "runtime": self.session.runtime, "format": self.manifest["model"]["format"],
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    # ---- inference
    def warmup(self, runs: int = 1) -> None:
        """Run zeros through the model (not timed into telemetry): first calls are slow."""
        if runs <= 0:
            return
        feeds = {}
        for s in self.inputs:
            dt = self._dtypes.get(s.name)
            if dt is None:
                return
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape)
            feeds[s.name] = np.zeros(shape, dtype=dt)
        for _ in range(runs):
            try:
                self.session.run(feeds)
            except Exception:  # noqa: BLE001 - a model that rejects zeros is still servable
                return

    def feeds(self, inputs: Any) -> dict[str, Any]:
        """Turn an array, a list (model order) or a mapping into named, typed inputs."""
        if isinstance(inputs, Mapping):
            items = inputs
        elif isinstance(inputs, (list, tuple)) and len(self.inputs) > 1:
            if len(inputs) != len(self.inputs):
                raise DataError(f"model takes {len(self.inputs)} inputs, got {len(inputs)}")
            items = {s.name: x for s, x in zip(self.inputs, inputs, strict=True)}
        else:
            if len(self.inputs) != 1:
                raise DataError(f"model takes {len(self.inputs)} inputs "
                                f"({', '.join(s.name for s in self.inputs)}): pass a dict")
            items = {self.inputs[0].name: inputs}
        out = {}
        for s in self.inputs:
            if s.name not in items:
                raise DataError(f"missing input {s.name!r} (model inputs: "
                                f"{', '.join(x.name for x in self.inputs)})")
            out[s.name] = self._convert(s, items[s.name])
        if len(items) != len(out):
            extra = sorted(set(items) - set(out))
            raise DataError(f"unknown input(s) {', '.join(extra)} (model inputs: "
                            f"{', '.join(x.name for x in self.inputs)})")
        return out

    def _convert(self, spec: TensorSpec, x: Any) -> Any:
        dt = self._dtypes.get(spec.name)
        if dt is None:
            return x
        if type(x) is np.ndarray and x.dtype == dt and x.ndim == len(spec.shape):
            return x  # the common case, kept cheap: this runs on every call
        arr = np.asarray(x)
        if dt.kind == "U" and arr.dtype.kind == "O":
            arr = np.vectorize(lambda v: "" if v is None else str(v), otypes=[str])(arr)
        if spec.scale and dt.kind in "iu" and arr.dtype.kind == "f":
            info = np.iinfo(dt)  # quantize float input for an int8/uint8 model
            arr = np.clip(np.round(arr / spec.scale + spec.zero_point), info.min, info.max)
        if dt.kind == "U" and arr.dtype.kind in "fc":
            raise DataError(f"input {spec.name!r} takes strings, not {arr.dtype} numbers")
        if arr.dtype != dt and not (dt.kind == "U" and arr.dtype.kind == "U"):
            arr = arr.astype(dt)
        rank = len(spec.shape)
        if rank and arr.ndim == rank - 1 and spec.shape[0] in (1, None, "batch", "N"):
            arr = arr[None]  # one sample without its batch axis
        elif arr.ndim < rank and all(isinstance(d, int) and d > 0 for d in spec.shape) and \
                arr.size == int(np.prod(spec.shape)):
            arr = arr.reshape(spec.shape)  # e.g. one value for a (1, 1) input
        return arr

    def run(self, feeds: Mapping[str, Any]) -> list[Any]:
        """Outputs in model order for already-typed feeds; timed into telemetry."""
        t0 = time.perf_counter()
        try:
            outs = self.session.run(dict(feeds))
        except Exception:
            self.stats.record_error()
            raise
        self.stats.record((time.perf_counter() - t0) * 1000.0)
        return outs

    def predict(self, inputs: Any, *, dequantize: bool = False) -> dict[str, Any]:
        """``{output name: array}`` for inputs given as an array, a list or a dict by name."""
        try:
            feeds = self.feeds(inputs)
        except (DataError, ValueError, TypeError):
            self.stats.record_error()
            raise
        outs = self.run(feeds)
        result = _plain_outputs(dict(zip(self._output_names, outs, strict=False)))
        if self.drift is not None:
            self.drift.observe(feeds, result)
        if self.capture is not None:
            self.capture.observe(feeds, result, self.bundle_id)
        if dequantize:
            for s in self.outputs:
                v = result.get(s.name)
                if s.scale and isinstance(v, np.ndarray) and v.dtype.kind in "iu":
                    result[s.name] = (v.astype(np.float32) - s.zero_point) * s.scale
        return result


class InferenceService:
    """The agent's current model, swappable while requests are served (thread-safe)."""

    def __init__(self, stats: LatencyStats) -> None:
        self.stats = stats
        self._model: Model | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Model | None:
        return self._model

    def swap(self, model: Model | None) -> Model | None:
        with self._lock:
            old, self._model = self._model, model
        return old

    def require(self) -> Model:
        model = self._model
        if model is None:
            raise NoModelError("no bundle is active on this device yet: deploy one")
        return model


# ---- tensors on the wire
def _npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items() if isinstance(v, np.ndarray)})
    return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json_tensor(v: Any) -> Any:
    if isinstance(v, Mapping) and "b64" in v:
        raw = base64.b64decode(v["b64"])
        return np.frombuffer(raw, dtype=np.dtype(v["dtype"])).reshape(v.get("shape") or (-1,))
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgepack-agent"
    service: InferenceService  # set on the subclass per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        model = self.service.model
        if self.path == "/v1/health":
            self._json(200 if model else 503, {"ok": model is not None,
                                               "bundle_id": model.bundle_id if model else None})
        elif self.path == "/v1/model":
            if model is None:
                self._json(503, {"error": "no bundle is active on this device yet"})
            else:
                self._json(200, model.describe())
        else:
            self._json(404, {"error": f"no such endpoint {self.path}; use /v1/predict, "
                             "/v1/model or /v1/health"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path != "/v1/predict":
            self._json(404, {"error": f"no such endpoint {self.path}; POST /v1/predict"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._json(413, {"error": f"body must be 0..{MAX_BODY} bytes with a Content-Length"})
            return
        body = self.rfile.read(length)
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        binary = ctype in (NPZ, NPY) or NPZ in (self.headers.get("Accept") or "")
        try:
            model = self.service.require()
        except NoModelError as exc:
            self._json(503, {"error": str(exc)})
            return
        try:
            if ctype == NPZ:
                inputs: Any = _load_npz(body)
            elif ctype == NPY:
                inputs = np.load(io.BytesIO(body), allow_pickle=False)
            else:
                doc = json.loads(body or b"{}")
                raw = doc.get("inputs") if isinstance(doc, dict) else None
                if raw is None:
                    raise DataError('JSON body must be {"inputs": {name: tensor}}')
                inputs = {k: _json_tensor(v) for k, v in raw.items()} if isinstance(
                    raw, dict) else [_json_tensor(v) for v in raw]
            t0 = time.perf_counter()
            outputs = model.predict(inputs)
            ms = (time.perf_counter() - t0) * 1000.0
        except (DataError, ValueError, TypeError, KeyError) as exc:
            self._json(400, {"error": f"bad input: {exc}"})
            return
        except Exception as exc:  # noqa: BLE001 - the runtime's own errors become a 500
            self._json(500, {"error": f"inference failed: {exc}"})
            return
        if binary:
            self._send(200, _npz_bytes(outputs), NPZ)
            return
        self._json(200, {
            "outputs": {k: _jsonable(v) for k, v in outputs.items()},
            "dtypes": {k: "string" if v.dtype.kind == "U" else str(v.dtype)
                       for k, v in outputs.items() if isinstance(v, np.ndarray)},
            "shapes": {k: list(v.shape) for k, v in outputs.items() if isinstance(v, np.ndarray)},
            "latency_ms": round(ms, 4), "bundle_id": model.bundle_id})


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        sock, _ = super().get_request()
        return sock, ("unix", 0)


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class InferenceServer:
    """The local endpoint: a Unix socket and/or a loopback HTTP port, each in its own thread."""

    def __init__(self, service: InferenceService, *, socket_path: str | os.PathLike | None = None,
                 http: str = "") -> None:
        self.service = service
        handler = type("Handler", (_Handler,), {"service": service})
        self._servers: list[socketserver.BaseServer] = []
        self.socket_path = Path(socket_path) if socket_path else None
        self.http_address: tuple[str, int] | None = None
        if self.socket_path is not None:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            if self.socket_path.is_socket() or self.socket_path.exists():
                self.socket_path.unlink()
            self._servers.append(_UnixHTTPServer(str(self.socket_path), handler))
            os.chmod(self.socket_path, 0o660)
        if http:
            host, _, port = http.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            srv = _TCPServer((host, int(port)), handler)
            self.http_address = srv.server_address[:2]
            self._servers.append(srv)
        self._threads: list[threading.Thread] = []

    def start(self) -> InferenceServer:
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="edgepack-inference", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Client:
    """Call a running agent's inference endpoint (``unix:/path`` or ``http://127.0.0.1:port``)."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            ep = self.endpoint
            if ep.startswith("unix:"):
                self._conn = _UnixConnection(ep[5:], self.timeout)
            elif ep.startswith("http://"):
                hostport = ep[7:].rstrip("/")
                host, _, port = hostport.rpartition(":")
                self._conn = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
            else:
                self._conn = _UnixConnection(ep, self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, str, bytes]:
        for attempt in (0, 1):  # one retry on a stale keep-alive connection
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=dict(headers or {}))
                resp = conn.getresponse()
                return resp.status, resp.getheader("Content-Type") or "", resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt:
                    raise EdgepackError(f"cannot reach the agent's inference endpoint "
                                        f"{self.endpoint}: {exc}. Is edgepack-agent running?"
                                        ) from None
        raise AssertionError("unreachable")

    def _check(self, status: int, ctype: str, data: bytes) -> None:
        if status == 200:
            return
        try:
            msg = json.loads(data).get("error", "")
        except ValueError:
            msg = data[:200].decode(errors="replace")
        if status == 503:
            raise NoModelError(msg or "no bundle is active")
        raise DataError(f"inference endpoint answered {status}: {msg}")

    def info(self) -> dict[str, Any]:
        status, ctype, data = self.request("GET", "/v1/model")
        self._check(status, ctype, data)
        return json.loads(data)

    def predict(self, inputs: Mapping[str, Any] | Sequence[Any] | np.ndarray) -> dict[str, Any]:
        """Outputs by name; arrays travel as npz, so dtypes and shapes are exact."""
        if isinstance(inputs, Mapping):
            body, ctype = _npz_bytes({k: np.asarray(v) for k, v in inputs.items()}), NPZ
        else:
            buf = io.BytesIO()
            np.save(buf, np.asarray(inputs), allow_pickle=False)
            body, ctype = buf.getvalue(), NPY
        status, rtype, data = self.request("POST", "/v1/predict", body,
                                           {"Content-Type": ctype, "Accept": NPZ})
        self._check(status, rtype, data)
        return _load_npz(data)
