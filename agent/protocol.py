"""Wire protocol v1: topic names and message schemas shared by the agent and the host.

Prefix ``edgepack/v1/{fleet}/``. JSON payloads (UTF-8) except chunks (raw bytes); every JSON
message carries ``ts`` (unix seconds). MQTT 3.1.1 features only. ``docs/protocol.md`` is the
reference a firmware author implements from; keep the two in step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgepack.agent.errors import ProtocolError

__all__ = [
    "VERSION",
    "EVENT_KINDS",
    "Topics",
    "DesiredState",
    "ChunkTable",
    "check_id",
    "encode",
    "decode",
    "parse_desired",
    "desired_from_control",
    "parse_chunk_table",
    "chunk_table_payload",
    "RESULT_KINDS",
    "REFUSAL_REASONS",
    "MAX_EVAL_BYTES",
    "MAX_JOB_BUNDLES",
    "JobBundle",
    "ProfileJob",
    "job_signed_part",
    "parse_profile_job",
    "parse_result",
]

VERSION = "v1"
EVENT_KINDS = (
    "download_started", "download_progress", "downloaded", "verified", "rejected", "staged",
    "health_checking", "installed", "health_failed", "rolled_back", "error",
)
MAX_JSON_BYTES = 1024**2  # manifests carry a chunk table: 1 MiB holds > 10,000 chunk hashes
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_id(value: Any, what: str = "device id") -> str:
    """Device ids, group and fleet names: ASCII letters, digits, ``_ . : -``; never ``/ + #``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ProtocolError(
            f"{what} {value!r} is not allowed: use 1-128 ASCII letters, digits, '_', '.', ':' or "
            "'-', starting with a letter or digit (no '/', '+', '#', spaces or non-ASCII)")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet."""

    fleet: str = "default"

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")

    @property
    def prefix(self) -> str:
        return f"edgepack/{VERSION}/{self.fleet}/"

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}devices/{check_id(device_id)}/{leaf}"

    def state(self, device_id: str) -> str:
        return self.device(device_id, "state")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def jobs(self, device_id: str) -> str:
        """Profile jobs for one device (host → device, QoS 1, not retained)."""
        return self.device(device_id, "jobs")

    def results(self, device_id: str) -> str:
        """Profile job answers: accepted/refused, progress, per-bundle results, done."""
        return self.device(device_id, "results")

    def downgrade(self, device_id: str) -> str:
        """Protocol v2: the release-signed downgrade authorization for one device (retained)."""
        return self.device(device_id, "downgrade")

    @property
    def freshness(self) -> str:
        """Protocol v2: the fleet server's freshness signature (retained, online key)."""
        return f"{self.prefix}freshness"

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}groups/{check_id(group, 'group name')}/desired"

    def bundle_manifest(self, bundle_id: str) -> str:
        return f"{self.prefix}bundles/{_check_sha(bundle_id)}/manifest"

    def bundle_chunk(self, bundle_id: str, index: int) -> str:
        return f"{self.prefix}bundles/{_check_sha(bundle_id)}/chunks/{int(index)}"

    def all_devices(self, leaf: str = "+") -> str:
        """Wildcard subscription over every device (``leaf`` = state, telemetry, events or +)."""
        return f"{self.prefix}devices/+/{leaf}"

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """``(device_id, leaf)`` for a device topic of this fleet."""
        if not topic.startswith(self.prefix + "devices/"):
            raise ProtocolError(f"topic {topic!r} is not a device topic of fleet {self.fleet}")
        parts = topic[len(self.prefix):].split("/")
        if len(parts) != 3:
            raise ProtocolError(f"topic {topic!r} is not devices/<id>/<leaf>")
        return check_id(parts[1]), parts[2]


def _check_sha(v: Any) -> str:
    if not isinstance(v, str) or not _SHA.match(v):
        raise ProtocolError(f"bundle id {v!r} is not a sha256 hex digest")
    return v


def encode(payload: Mapping[str, Any]) -> bytes:
    """JSON payload with ``ts`` added when missing."""
    body = dict(payload)
    body.setdefault("ts", time.time())
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def decode(data: bytes, what: str = "message") -> dict:
    """Parse a JSON object payload; ProtocolError for anything else."""
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {MAX_JSON_BYTES} byte limit")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also: integers over 4300 digits, deep nesting
        raise ProtocolError(f"{what} is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def _field(d: Mapping, key: str, typ: type | tuple, what: str, *, required: bool = True) -> Any:
    if key not in d or d[key] is None:
        if required:
            raise ProtocolError(f"{what} is missing '{key}'")
        return None
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ProtocolError(f"{what} field '{key}' has the wrong type ({type(v).__name__})")
    return v


@dataclass(frozen=True)
class DesiredState:
    """What the host wants a device (or group) to run."""

    deployment_id: str
    bundle_id: str
    name: str
    version: str
    allow_downgrade: bool = False
    ts: float = 0.0
    #: protocol v2 only: the signed bundle length, the signed version of the message and the
    #: keys whose signatures were accepted (v1 desired states carry none of these)
    length: int | None = None
    signed_version: int | None = None
    key_ids: tuple[str, ...] = ()

    @property
    def signed(self) -> bool:
        return self.signed_version is not None

    def to_payload(self) -> dict:
        return {"deployment_id": self.deployment_id, "bundle_id": self.bundle_id,
                "name": self.name, "version": self.version,
                "allow_downgrade": self.allow_downgrade, "ts": self.ts or time.time()}


def parse_desired(data: bytes) -> DesiredState | None:
    """A desired-state payload, v1 or v2, *not verified*; None for the empty retained message
    that clears it (and for a v2 signed clear).

    Hosts and the fleet simulator read desired states with this; the agent verifies v2
    messages first (:class:`edgepack.agent.trust.DesiredGate`) and reads v1 only in its
    ``allow_unsigned`` development mode.
    """
    if not data:
        return None
    d = decode(data, "desired state")
    if "signed" in d and "signatures" in d:
        from edgepack.agent.trust.control import parse_control

        return desired_from_control(parse_control(data))
    return DesiredState(
        deployment_id=check_id(_field(d, "deployment_id", str, "desired state"), "deployment id"),
        bundle_id=_check_sha(_field(d, "bundle_id", str, "desired state")),
        name=_field(d, "name", str, "desired state"),
        version=_field(d, "version", str, "desired state"),
        allow_downgrade=bool(_field(d, "allow_downgrade", bool, "desired state", required=False)),
        ts=float(_field(d, "ts", (int, float), "desired state", required=False) or 0.0),
    )


def desired_from_control(msg: Any, key_ids: tuple[str, ...] = ()) -> DesiredState | None:
    """The desired state a v2 control message (parsed or verified) names; None: cleared."""
    t = msg.target
    if t is None:
        return None
    return DesiredState(deployment_id=check_id(str(msg.fields.get("deployment_id")),
                                               "deployment id"),
                        bundle_id=t.bundle_id, name=t.name or "", version=t.version or "",
                        ts=float(msg.issued), length=t.length, signed_version=msg.version,
                        key_ids=tuple(key_ids))


@dataclass(frozen=True)
class ChunkTable:
    """The retained ``bundles/{id}/manifest`` message: what to fetch and how to check it."""

    bundle_id: str
    bytes: int
    chunk_size: int
    chunks: tuple[str, ...]
    manifest: dict
    signature: dict | None
    table_sig: dict | None

    def signed_part(self) -> dict:
        return chunk_table_payload(self.bundle_id, self.bytes, self.chunk_size, self.chunks)


def chunk_table_payload(bundle_id: str, size: int, chunk_size: int, chunks: Any) -> dict:
    """The object whose canonical JSON ``table_sig`` signs."""
    return {"bundle_id": bundle_id, "bytes": size, "chunk_size": chunk_size,
            "chunks": list(chunks)}


def parse_chunk_table(data: bytes, expected_id: str | None = None) -> ChunkTable:
    """Parse and sanity-check a published bundle's manifest message (signature checked later)."""
    d = decode(data, "bundle manifest message")
    what = "bundle manifest message"
    bid = _check_sha(_field(d, "bundle_id", str, what))
    if expected_id is not None and bid != expected_id:
        raise ProtocolError(f"{what} is for bundle {bid[:12]}, expected {expected_id[:12]}")
    size = _field(d, "bytes", int, what)
    chunk_size = _field(d, "chunk_size", int, what)
    chunks = _field(d, "chunks", list, what)
    if size <= 0 or chunk_size <= 0:
        raise ProtocolError(f"{what} has a non-positive size or chunk size")
    if len(chunks) != -(-size // chunk_size):
        raise ProtocolError(f"{what} lists {len(chunks)} chunks but {size} bytes in "
                            f"{chunk_size}-byte chunks need {-(-size // chunk_size)}")
    for c in chunks:
        _check_sha(c)
    return ChunkTable(bundle_id=bid, bytes=size, chunk_size=chunk_size, chunks=tuple(chunks),
                      manifest=_field(d, "manifest", dict, what),
                      signature=_field(d, "signature", dict, what, required=False),
                      table_sig=_field(d, "table_sig", dict, what, required=False))


# --------------------------------------------------------------------------- profile jobs
RESULT_KINDS = ("accepted", "refused", "progress", "result", "done")
REFUSAL_REASONS = ("malformed", "signature", "expired", "duplicate", "busy", "memory", "disk")
MAX_JOB_BUNDLES = 16
MAX_EVAL_BYTES = 512 * 1024  # decoded eval .npz: base64 keeps the job under MAX_JSON_BYTES
_UNSIGNED_FIELDS = ("sig", "ts")


@dataclass(frozen=True)
class JobBundle:
    """One published bundle a profile job names."""

    bundle_id: str
    bytes: int | None = None  # lets the device refuse early when its disk cannot hold it
    label: str = ""  # informational (e.g. the quantization scheme)

    def to_payload(self) -> dict:
        d: dict[str, Any] = {"bundle_id": self.bundle_id}
        if self.bytes is not None:
            d["bytes"] = self.bytes
        if self.label:
            d["label"] = self.label
        return d


@dataclass(frozen=True)
class ProfileJob:
    """A signed request to measure published bundles on one device (``devices/{id}/jobs``).

    Every field the signature covers is a string, integer, boolean, null, array or object — no
    floats — so that any implementation re-encodes the same canonical JSON.
    """

    job_id: str
    deadline: int  # unix seconds (device clock): answer before, never start after
    bundles: tuple[JobBundle, ...]
    runs: int = 50
    warmup: int = 5
    threads: int = 0  # 0: as the device runs the bundle (its config, then the bundle's)
    op_profile: bool = True
    timeout_s: int = 300  # wall time the device may spend from receipt (clock-skew guard)
    max_rss_mb: int | None = None  # kill a measurement whose RSS exceeds this
    eval_npz: bytes | None = field(default=None, repr=False)
    sig: dict | None = None

    def to_payload(self) -> dict:
        """The signed part (no ``sig``, no ``ts``)."""
        d: dict[str, Any] = {
            "job_id": self.job_id, "deadline": int(self.deadline),
            "bundles": [b.to_payload() for b in self.bundles], "runs": self.runs,
            "warmup": self.warmup, "threads": self.threads, "op_profile": self.op_profile,
            "timeout_s": int(self.timeout_s), "max_rss_mb": self.max_rss_mb,
            "eval": None,
        }
        if self.eval_npz is not None:
            d["eval"] = {"npz": base64.b64encode(self.eval_npz).decode(),
                         "sha256": hashlib.sha256(self.eval_npz).hexdigest()}
        return d


def job_signed_part(payload: Mapping[str, Any]) -> dict:
    """What a job's ``sig`` covers: every field except ``sig`` and ``ts``."""
    return {k: v for k, v in payload.items() if k not in _UNSIGNED_FIELDS}


def _no_floats(obj: Any, where: str) -> None:
    if isinstance(obj, float):
        raise ProtocolError(f"profile job field '{where}' is a float; signed job fields must be "
                            "integers (canonical JSON has no portable float form)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_floats(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_floats(v, f"{where}[{i}]")


def _int_in(d: Mapping, key: str, lo: int, hi: int, default: int | None, what: str) -> int | None:
    v = _field(d, key, int, what, required=False)
    if v is None:
        return default
    if not lo <= v <= hi:
        raise ProtocolError(f"{what} field '{key}' = {v} is outside [{lo}, {hi}]")
    return v


def parse_profile_job(data: bytes) -> ProfileJob:
    """Parse and bound-check a profile job (the signature is checked by the caller)."""
    what = "profile job"
    d = decode(data, what)
    job_id = check_id(_field(d, "job_id", str, what), "job id")
    _no_floats(job_signed_part(d), "")
    raw_bundles = _field(d, "bundles", list, what)
    if not 1 <= len(raw_bundles) <= MAX_JOB_BUNDLES:
        raise ProtocolError(f"{what} names {len(raw_bundles)} bundles (1 to {MAX_JOB_BUNDLES})")
    bundles = []
    for i, b in enumerate(raw_bundles):
        if not isinstance(b, dict):
            raise ProtocolError(f"{what} bundles[{i}] is not an object")
        size = _field(b, "bytes", int, f"{what} bundles[{i}]", required=False)
        bundles.append(JobBundle(bundle_id=_check_sha(_field(b, "bundle_id", str, what)),
                                 bytes=size, label=str(b.get("label") or "")[:64]))
    eval_npz = None
    ev = _field(d, "eval", dict, what, required=False)
    if ev is not None:
        text = _field(ev, "npz", str, f"{what} eval")
        if len(text) > (MAX_EVAL_BYTES * 4) // 3 + 4:
            raise ProtocolError(f"{what} eval samples are over {MAX_EVAL_BYTES} bytes")
        try:
            eval_npz = base64.b64decode(text, validate=True)
        except (ValueError, TypeError):
            raise ProtocolError(f"{what} eval.npz is not base64") from None
        digest = _field(ev, "sha256", str, f"{what} eval")
        if hashlib.sha256(eval_npz).hexdigest() != digest:
            raise ProtocolError(f"{what} eval samples do not match their sha256")
    deadline = _field(d, "deadline", int, what)
    op_profile = _field(d, "op_profile", bool, what, required=False)
    return ProfileJob(
        job_id=job_id, deadline=deadline, bundles=tuple(bundles),
        runs=_int_in(d, "runs", 1, 100_000, 50, what),
        warmup=_int_in(d, "warmup", 0, 10_000, 5, what),
        threads=_int_in(d, "threads", 0, 1024, 0, what),
        op_profile=True if op_profile is None else op_profile,
        timeout_s=_int_in(d, "timeout_s", 1, 86_400, 300, what),
        max_rss_mb=_int_in(d, "max_rss_mb", 1, 1 << 30, None, what),
        eval_npz=eval_npz, sig=_field(d, "sig", dict, what, required=False))


def parse_result(data: bytes) -> dict:
    """A message from ``devices/{id}/results``: checked for ``job_id`` and ``kind``."""
    what = "profile result"
    d = decode(data, what)
    _field(d, "job_id", str, what)
    kind = _field(d, "kind", str, what)
    if kind not in RESULT_KINDS:
        raise ProtocolError(f"{what} kind {kind!r} is not one of {', '.join(RESULT_KINDS)}")
    return d
