"""The agent's configuration: ``agent.toml`` read into frozen dataclasses.

Unknown keys are an error naming the file and the key, so a typo never silently falls back to a
default. Relative paths (``data_dir``, ``trusted_keys``, TLS files, the serve socket) are resolved
against the directory of the config file, so a config and its keys can travel together.

::

    device_id = "pi-kitchen"
    board = "rpi4"
    target = "rpi4"
    fleet = "default"
    groups = ["rpi4-fleet"]
    data_dir = "/var/lib/edgepack"
    trusted_keys = ["/etc/edgepack/keys/fleet.pub"]

    [broker]
    url = "mqtts://broker.example:8883"

    [transfer]
    window = 8
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.errors import EdgepackError
from edgepack.agent.mqtt import BrokerConfig, parse_broker_url
from edgepack.agent.protocol import check_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "BrokerSection",
    "TransferSection",
    "RuntimeSection",
    "HealthSection",
    "TelemetrySection",
    "DriftSection",
    "ServeSection",
    "AgentConfig",
    "load_config",
    "parse_config",
    "write_config",
    "render_config",
]


class ConfigError(EdgepackError):
    """The agent configuration file is missing, malformed or names an unknown key."""


@dataclass(frozen=True)
class BrokerSection:
    """Where the broker is; credentials and TLS files for ``mqtts://``."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    ca: str = ""  # CA bundle that signed the broker's certificate (private CA)
    cert: str = ""  # client certificate (mutual TLS)
    key: str = ""  # client private key
    keepalive: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    # "auto": MQTT 5, or 3.1.1 when the broker refuses 5; or "5", "3.1.1"
    protocol: str = "auto"
    # MQTT 5 Maximum Packet Size: the broker drops anything bigger before it reaches the device
    # (1 MiB chunks or control messages, plus topic and headers)
    max_packet_kb: int = 1088
    session_expiry_s: int = 7 * 86400  # MQTT 5: how long the broker keeps our session offline
    inbox_max_mb: float = 32.0  # received messages waiting for the agent loop; beyond: shed


@dataclass(frozen=True)
class TransferSection:
    """How bundles are fetched."""

    window: int = 16  # chunks requested at a time (16 x 256 KiB = 4 MiB in flight)
    chunk_timeout_s: float = 30.0  # a window must complete within this (while connected)
    manifest_timeout_s: float = 30.0  # the retained bundle manifest must arrive within this
    max_bundle_mb: float = 1024.0  # refuse anything larger
    min_free_mb: float = 64.0  # keep this much disk free after download + unpack
    retry_s: float = 30.0  # wait before retrying a failed (not rejected) download
    max_retries: int = 10  # per deployment; then it is reported and left alone


@dataclass(frozen=True)
class RuntimeSection:
    """Inference runtime settings."""

    threads: int = 0  # 0: the bundle's choice, else as many as cores


@dataclass(frozen=True)
class HealthSection:
    """The health gate and the crash-loop watchdog."""

    timeout_s: float = 120.0  # the whole health check (load + golden + latency)
    latency_runs: int = 50  # timed runs for p95 (after warm-up)
    warmup_runs: int = 3
    crash_window_s: float = 300.0  # an unclean restart this soon after a commit is a crash
    max_crashes: int = 3  # that many crashes in the window roll back to the previous bundle
    enforce_budgets: bool = True  # p95 latency and peak RSS must fit the bundle's budgets


@dataclass(frozen=True)
class TelemetrySection:
    """Periodic telemetry and the on-disk outbox."""

    interval_s: float = 30.0
    outbox_max_bytes: int = 8 * 1024**2
    qos: int = 1


@dataclass(frozen=True)
class DriftSection:
    """Drift sketches of live inferences, when the active bundle has ``drift.json``."""

    enabled: bool = True
    sample_rate: float = 0.01  # fraction of inference calls sketched (docs/drift.md)


@dataclass(frozen=True)
class ServeSection:
    """The local inference endpoint: a Unix socket, loopback HTTP, both, or neither."""

    socket: str = "agent.sock"  # relative to data_dir; "" disables
    http: str = ""  # "127.0.0.1:8765"; only loopback addresses are accepted


@dataclass(frozen=True)
class AgentConfig:
    """One device's agent configuration."""

    device_id: str
    data_dir: str
    target: str
    board: str = ""
    fleet: str = "default"
    groups: tuple[str, ...] = ()
    trusted_keys: tuple[str, ...] = ()
    trust_root: str = ""  # the fleet's root.json (protocol v2); "" derives one from trusted_keys
    freshness_bound_s: float = 0.0  # report `freshness` stale beyond this age; 0: not checked
    allow_unsigned: bool = False
    compatible_targets: tuple[str, ...] = ()
    log_level: str = "info"
    broker: BrokerSection = field(default_factory=BrokerSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    health: HealthSection = field(default_factory=HealthSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    serve: ServeSection = field(default_factory=ServeSection)
    drift: DriftSection = field(default_factory=DriftSection)
    source: str = ""

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def socket_path(self) -> Path | None:
        if not self.serve.socket:
            return None
        return self.data_path / self.serve.socket

    def broker_config(self) -> BrokerConfig:
        """The :class:`BrokerConfig` for :func:`edgepack.agent.mqtt.make_client`."""
        b = self.broker
        return parse_broker_url(
            b.url, username=b.username or None, password=b.password or None,
            ca=b.ca or None, cert=b.cert or None, key=b.key or None, keepalive=b.keepalive,
            connect_timeout=b.connect_timeout_s)

    def accepts_target(self, target: str) -> bool:
        return target == self.target or target in self.compatible_targets

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


_SECTIONS: dict[str, type] = {
    "broker": BrokerSection,
    "transfer": TransferSection,
    "runtime": RuntimeSection,
    "health": HealthSection,
    "telemetry": TelemetrySection,
    "serve": ServeSection,
    "drift": DriftSection,
}
_TOP = {f.name: f for f in dataclasses.fields(AgentConfig)
        if f.name not in _SECTIONS and f.name != "source"}
_REQUIRED = ("device_id", "data_dir", "target")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return True


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ""  # required string fields


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{where}] must be a table", file=source, key=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: "
                              f"{', '.join(sorted(fields))})", file=source, key=f"{where}.{key}")
        default = _default_of(fields[key])
        if not _type_ok(value, default):
            raise ConfigError(f"{source}: '{where}.{key}' must be a {type(default).__name__}, "
                              f"got {value!r}", file=source, key=f"{where}.{key}")
        kwargs[key] = float(value) if isinstance(default, float) else value
    return cls(**kwargs)


def _resolve(base: Path, p: str) -> str:
    if not p:
        return p
    path = Path(os.path.expanduser(p))
    return str(path if path.is_absolute() else (base / path).resolve())


def parse_config(data: dict[str, Any], source: str = "agent.toml",
                 base_dir: str | os.PathLike | None = None) -> AgentConfig:
    """Build an :class:`AgentConfig` from parsed TOML; relative paths resolve against ``base_dir``."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, key, source)
        elif key in _TOP:
            default = _default_of(_TOP[key])
            if not _type_ok(value, default):
                raise ConfigError(f"{source}: '{key}' must be a {type(default).__name__}, got "
                                  f"{value!r}", file=source, key=key)
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            known = sorted([*_TOP, *_SECTIONS])
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(known)})",
                              file=source, key=key)
    for key in _REQUIRED:
        if not kwargs.get(key):
            raise ConfigError(f"{source}: '{key}' is required", file=source, key=key)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    kwargs["data_dir"] = _resolve(base, kwargs["data_dir"])
    kwargs["trusted_keys"] = tuple(_resolve(base, k) for k in kwargs.get("trusted_keys", ()))
    kwargs["trust_root"] = _resolve(base, kwargs.get("trust_root", ""))
    if "broker" in kwargs:
        b = kwargs["broker"]
        kwargs["broker"] = dataclasses.replace(b, ca=_resolve(base, b.ca),
                                               cert=_resolve(base, b.cert),
                                               key=_resolve(base, b.key))
    cfg = AgentConfig(source=source, **kwargs)
    _check(cfg, source)
    return cfg


def _check(cfg: AgentConfig, source: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' {msg}", file=source, key=key)

    try:
        check_id(cfg.device_id)
        check_id(cfg.fleet, "fleet name")
        for g in cfg.groups:
            check_id(g, "group name")
    except EdgepackError as exc:
        raise ConfigError(f"{source}: {exc}", file=source) from None
    if not cfg.trusted_keys and not cfg.trust_root and not cfg.allow_unsigned:
        raise bad("trusted_keys", "is empty: list the fleet's public key(s) (fleet.pub), or set "
                  "trust_root (the fleet's root.json), or allow_unsigned = true for development")
    try:
        cfg.broker_config()
    except EdgepackError as exc:
        raise bad("broker.url", f"is invalid: {exc}") from None
    b = cfg.broker
    if b.protocol not in ("auto", "5", "3.1.1"):
        raise bad("broker.protocol", "must be auto, 5 or 3.1.1")
    if b.max_packet_kb < 64:
        raise bad("broker.max_packet_kb", "must be at least 64 (a chunk or control message "
                  "must fit)")
    if b.session_expiry_s < 0 or b.inbox_max_mb <= 0:
        raise bad("broker", "session_expiry_s must be 0 or more and inbox_max_mb positive")
    t = cfg.transfer
    if t.window < 1 or t.window > 256:
        raise bad("transfer.window", "must be between 1 and 256")
    for key in ("chunk_timeout_s", "manifest_timeout_s", "max_bundle_mb"):
        if getattr(t, key) <= 0:
            raise bad(f"transfer.{key}", "must be positive")
    if cfg.runtime.threads < 0:
        raise bad("runtime.threads", "must be 0 (automatic) or more")
    if cfg.health.max_crashes < 1 or cfg.health.latency_runs < 1:
        raise bad("health", "max_crashes and latency_runs must be at least 1")
    if cfg.telemetry.interval_s <= 0:
        raise bad("telemetry.interval_s", "must be positive")
    if cfg.telemetry.qos not in (0, 1):
        raise bad("telemetry.qos", "must be 0 or 1")
    if cfg.telemetry.outbox_max_bytes < 4096:
        raise bad("telemetry.outbox_max_bytes", "must be at least 4096")
    if not 0.0 <= cfg.drift.sample_rate <= 1.0:
        raise bad("drift.sample_rate", "must be between 0 and 1 (a fraction of inference calls)")
    if cfg.serve.http:
        host, _, port = cfg.serve.http.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
            raise bad("serve.http", "must be a loopback HOST:PORT such as 127.0.0.1:8765 (the "
                      "endpoint has no authentication, so it never listens on the network)")
    sock = cfg.socket_path
    if sock is not None and len(str(sock)) > 100:
        raise bad("serve.socket", f"resolves to {sock}, too long for a Unix socket path "
                  "(100 characters); use a shorter absolute path such as "
                  "/run/edgepack/agent.sock")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise bad("log_level", "must be debug, info, warning or error")


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read ``agent.toml``. Raises :class:`ConfigError` naming the file and the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"agent config {path} does not exist. Create one with 'edgepack agent "
                          "init'.", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror}",
                          file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): device ids, groups and "
                          "paths must be written in UTF-8, ids in ASCII", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", file=str(path)) from None
    return parse_config(data, str(path), base_dir=path.parent.resolve())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render_config(cfg: AgentConfig, *, comments: bool = True) -> str:
    """TOML text for ``cfg``: the top-level keys, then every section that differs from defaults."""
    lines = []
    if comments:
        lines += ["# edgepack agent configuration (edgepack-agent --config THIS_FILE).",
                  "# Unknown keys are errors. Relative paths resolve against this file's folder.",
                  ""]
    for name in _TOP:
        value = getattr(cfg, name)
        if name in _REQUIRED or value != _default_of(_TOP[name]):
            lines.append(f"{name} = {_toml_value(value)}")
    for section, cls in _SECTIONS.items():
        value = getattr(cfg, section)
        defaults = cls()
        rows = [f"{f.name} = {_toml_value(getattr(value, f.name))}"
                for f in dataclasses.fields(cls)
                if getattr(value, f.name) != getattr(defaults, f.name) or section == "broker"
                and f.name == "url"]
        if rows:
            lines += ["", f"[{section}]", *rows]
    return "\n".join(lines) + "\n"


def write_config(out: str | os.PathLike, cfg: AgentConfig | None = None, **fields: Any) -> Path:
    """Write an ``agent.toml`` from ``cfg`` or from keyword fields; return its path.

    Sections may be given as dicts (``broker={"url": ...}``). The result is read back with
    :func:`load_config` before it replaces ``out``, so a written config always loads.
    """
    out = Path(out)
    if cfg is None:
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()
                if v is not None}
        for key in _SECTIONS:
            if key in data and dataclasses.is_dataclass(data[key]):
                data[key] = dataclasses.asdict(data[key])
        cfg = parse_config(data, str(out), base_dir=out.parent.resolve() if out.parent.exists()
                           else out.parent.absolute())
    text = render_config(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # 0600 from the first byte: agent.toml may hold a broker password
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        load_config(tmp)
    except ConfigError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out
