"""Provisioning a device: write the ``agent.toml`` ``edgepack-agent`` runs with, from the
shipped per-board defaults (``firmware_configs/agents/<board>.toml``), the broker it reaches,
the keys it trusts and the fleet and groups it belongs to; make the device's own identity key
(``identity.key``, 0600, in its data directory) and write its public enrollment
(``enrollment.json`` next to the config) for ``edgepack fleet enroll``."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.agent.mqtt import BrokerConfig

__all__ = ["init_agent", "AgentSetup", "BOARDS", "board_template", "write_enrollment"]

BOARDS = ("rpi4", "rpi5", "rpi-zero-2w", "jetson-orin-nano", "x86-gateway")
_BROKER_KEYS = ("url", "ca", "cert", "key", "username", "password")


def board_template(board: str) -> dict[str, Any]:
    """The shipped ``firmware_configs/agents/<board>.toml`` as a dict."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    res = resources.files("edgepack.firmware_configs") / "agents" / f"{board}.toml"
    return tomllib.loads(res.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class AgentSetup:
    """The config :func:`init_agent` wrote, as the agent will read it."""

    config: str
    device_id: str
    board: str
    target: str
    fleet: str
    groups: tuple[str, ...]
    broker: str
    trusted_keys: tuple[str, ...]
    data_dir: str
    trust_root: str = ""
    enrollment_file: str = ""
    enrollment: dict[str, Any] | None = None  # {"device_id", "keyid", "key", "groups"}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(groups=list(self.groups), trusted_keys=list(self.trusted_keys))
        return out


def _broker_section(broker: str | BrokerConfig, template: dict[str, Any]) -> dict[str, Any]:
    """The ``[broker]`` table: the board's settings, the address and the credentials (TLS
    files as absolute paths)."""
    section = {k: v for k, v in template.items() if k not in _BROKER_KEYS}
    if isinstance(broker, str):
        section["url"] = broker
        return section
    section["url"] = broker.url
    for k in _BROKER_KEYS[1:]:
        v = getattr(broker, k)
        if v:
            section[k] = str(Path(v).resolve()) if k in ("ca", "cert", "key") else v
    return section


def init_agent(board: str, device_id: str, *, broker: str | BrokerConfig,
               out: str | Path = "/etc/edgepack/agent.toml", pub: Sequence[str | Path] = (),
               data_dir: str | Path = "/var/lib/edgepack", target: str | None = None,
               groups: Sequence[str] = (), fleet: str = "default", allow_unsigned: bool = False,
               root: str | Path | None = None, force: bool = False) -> AgentSetup:
    """Write ``out`` (mode 0600: it may hold a broker password) for ``device_id`` on
    ``board``; the trusted public keys ``pub`` (files such as fleet.pub) and the fleet's
    ``root`` (root.json of ``edgepack keys init``; protocol v2) are copied into a ``keys/``
    folder next to it. Without ``root`` the device derives its root from ``pub``: those keys
    sign bundles and desired states. Raises ConfigError for an existing ``out`` (unless
    ``force``), a device that would trust no key (unless ``allow_unsigned``), or a bad value,
    RootRefused for a ``root`` that does not verify, and ProfileError for an unknown
    ``target``. The device key in ``data_dir`` is made once and kept across ``force``.
    """
    from edgepack.agent.config import ConfigError, load_config, write_config
    from edgepack.agent.profiles import load_profile

    out_path = Path(out)
    if board not in BOARDS:
        raise ConfigError(f"unknown board {board!r}: pass `board=` one of {', '.join(BOARDS)}",
                          field="board")
    if out_path.exists() and not force:
        raise ConfigError(f"{out_path} exists; pass `force=` to overwrite it", field="force")
    if not pub and not allow_unsigned:
        raise ConfigError("pass `pub=` (fleet.pub, the key bundles are signed with), or "
                          "`allow_unsigned=` for development", field="pub")
    root_data = None
    if root is not None:
        from edgepack.agent.trust import TrustedRoot

        root_data = Path(root).read_bytes()
        TrustedRoot.check(root_data)
    data = board_template(board)
    if target:
        load_profile(target)  # unknown target: the error lists the known ones
        data["target"] = target
    keys_dir = out_path.parent / "keys"
    trusted = []
    for p in pub:
        src = Path(p).resolve()
        dst = (keys_dir / src.name).resolve()
        if src != dst:
            keys_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        trusted.append(str(dst))
    trust_root = ""
    if root_data is not None:
        from edgepack.agent.trust.privatefile import write_private

        trust_root = str(write_private(keys_dir / "root.json", root_data).resolve())
    data.update(device_id=device_id, fleet=fleet, data_dir=str(Path(data_dir).absolute()),
                trusted_keys=trusted, allow_unsigned=allow_unsigned, trust_root=trust_root,
                broker=_broker_section(broker, data.get("broker", {})))
    if groups:
        data["groups"] = list(groups)
    path = write_config(out_path, **data)
    cfg = load_config(path)
    enrollment, enrollment_file = write_enrollment(cfg.data_dir, cfg.device_id, cfg.groups,
                                                   out_path.parent / "enrollment.json")
    return AgentSetup(config=str(path), device_id=cfg.device_id, board=cfg.board,
                      target=cfg.target, fleet=cfg.fleet, groups=tuple(cfg.groups),
                      broker=cfg.broker.url, trusted_keys=tuple(cfg.trusted_keys),
                      data_dir=cfg.data_dir, trust_root=cfg.trust_root,
                      enrollment_file=str(enrollment_file), enrollment=enrollment)


def write_enrollment(data_dir: str | Path, device_id: str, groups: Sequence[str],
                     out: str | Path) -> tuple[dict[str, Any], Path]:
    """Make (or keep) the device key in ``data_dir`` and write its public enrollment to
    ``out``: ``{"device_id", "keyid", "key", "groups"}`` (the groups are a proposal; the
    operator decides them at ``edgepack fleet enroll``)."""
    import json

    from edgepack.agent.identity import DeviceIdentity

    identity = DeviceIdentity.load_or_create(data_dir)
    doc = {**identity.enrollment(device_id), "groups": list(groups)}
    out = Path(out)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return doc, out
