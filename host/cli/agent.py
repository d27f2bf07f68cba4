"""CLI: ``edgepack agent init`` (write a device's agent.toml) and ``edgepack publish``."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click

__all__ = ["register", "BOARDS", "board_template"]

BOARDS = ("rpi4", "rpi5", "rpi-zero-2w", "jetson-orin-nano", "x86-gateway")


def board_template(board: str) -> dict[str, Any]:
    """The shipped ``firmware_configs/agents/<board>.toml`` as a dict."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    res = resources.files("edgepack.firmware_configs") / "agents" / f"{board}.toml"
    return tomllib.loads(res.read_text(encoding="utf-8"))


def _broker_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--broker", required=True, envvar="EDGEPACK_BROKER",
                     help="mqtt://host[:1883] or mqtts://host[:8883] ($EDGEPACK_BROKER)."),
        click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate that signed the broker's certificate."),
        click.option("--cert", type=click.Path(exists=True, dir_okay=False),
                     help="Client certificate (mutual TLS)."),
        click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
                     help="Client certificate's private key."),
        click.option("--username", envvar="EDGEPACK_BROKER_USERNAME"),
        click.option("--password", envvar="EDGEPACK_BROKER_PASSWORD"),
    ]):
        f = opt(f)
    return f


def register(main: click.Group) -> None:
    """Add ``agent`` and ``publish`` to the ``edgepack`` group."""

    @main.group("agent")
    def agent() -> None:
        """Set up the on-device agent (edgepack-agent)."""

    @agent.command("init")
    @click.option("--board", required=True, type=click.Choice(BOARDS),
                  help="Board: picks the per-board defaults in firmware_configs/agents/.")
    @click.option("--device-id", required=True, help="Unique id of this device in the fleet.")
    @_broker_options
    @click.option("--pub", "pubs", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="Trusted public key (fleet.pub); repeatable. Copied next to the config.")
    @click.option("--data-dir", default="/var/lib/edgepack", show_default=True,
                  help="Slots, downloads, outbox and the inference socket live here.")
    @click.option("--out", default="/etc/edgepack/agent.toml", show_default=True,
                  type=click.Path(dir_okay=False), help="Where to write agent.toml.")
    @click.option("--target", help="Device profile (default: the board's).")
    @click.option("--group", "groups", multiple=True, help="Deployment group; repeatable.")
    @click.option("--fleet", default="default", show_default=True)
    @click.option("--allow-unsigned", is_flag=True,
                  help="Accept unsigned bundles (development only).")
    @click.option("--force", is_flag=True, help="Overwrite an existing config.")
    @click.option("--json", "as_json", is_flag=True)
    def init(board: str, device_id: str, broker: str, ca: str | None, cert: str | None,
             client_key: str | None, username: str | None, password: str | None,
             pubs: tuple[str, ...], data_dir: str, out: str, target: str | None,
             groups: tuple[str, ...], fleet: str, allow_unsigned: bool, force: bool,
             as_json: bool) -> None:
        """Write agent.toml for a device (start it with: edgepack-agent --config OUT)."""
        from edgepack.agent.config import ConfigError, load_config, write_config
        from edgepack.agent.profiles import load_profile
        from edgepack.host.cli.main import emit

        out_path = Path(out)
        if out_path.exists() and not force:
            raise ConfigError(f"{out_path} exists; pass --force to overwrite it")
        if not pubs and not allow_unsigned:
            raise ConfigError("pass --pub fleet.pub (the key bundles are signed with), or "
                              "--allow-unsigned for development")
        data = board_template(board)
        if target:
            load_profile(target)  # unknown target: the error lists the known ones
            data["target"] = target
        keys_dir = out_path.parent / "keys"
        trusted = []
        for p in pubs:
            src = Path(p).resolve()
            dst = (keys_dir / src.name).resolve()
            if src != dst:
                keys_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            trusted.append(str(dst))
        broker_section = {k: v for k, v in data.get("broker", {}).items()
                          if k not in ("url", "ca", "cert", "key", "username", "password")}
        broker_section["url"] = broker
        for k, v in (("ca", ca), ("cert", cert), ("key", client_key), ("username", username),
                     ("password", password)):
            if v:
                broker_section[k] = str(Path(v).resolve()) if k in ("ca", "cert", "key") else v
        data.update(device_id=device_id, fleet=fleet, data_dir=str(Path(data_dir).absolute()),
                    trusted_keys=trusted, allow_unsigned=allow_unsigned, broker=broker_section)
        if groups:
            data["groups"] = list(groups)
        path = write_config(out_path, **data)
        cfg = load_config(path)
        result = {"config": str(path), "device_id": cfg.device_id, "board": cfg.board,
                  "target": cfg.target, "fleet": cfg.fleet, "groups": list(cfg.groups),
                  "broker": cfg.broker.url, "trusted_keys": list(cfg.trusted_keys),
                  "data_dir": cfg.data_dir}

        def render(r: dict) -> None:
            click.echo(f"wrote {r['config']} for {r['device_id']} ({board}, target "
                       f"{r['target']}, fleet {r['fleet']})")
            click.echo(f"start it with: edgepack-agent --config {r['config']}")

        emit(result, as_json, render)

    @main.command("publish")
    @click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
    @_broker_options
    @click.option("--key", type=click.Path(exists=True, dir_okay=False),
                  help="Fleet private key: signs the chunk table (devices refuse unsigned "
                  "tables unless allow_unsigned).")
    @click.option("--fleet", default="default", show_default=True)
    @click.option("--chunk-kb", type=click.IntRange(1, 65536),
                  help="Chunk size (default: the bundle target's transfer.chunk_kb).")
    @click.option("--force", is_flag=True, help="Publish again even if already retained.")
    @click.option("--json", "as_json", is_flag=True)
    def publish(bundle: str, broker: str, ca: str | None, cert: str | None,
                client_key: str | None, username: str | None, password: str | None,
                key: str | None, fleet: str, chunk_kb: int | None, force: bool,
                as_json: bool) -> None:
        """Publish BUNDLE to the broker as retained chunks for devices to fetch."""
        from edgepack.agent.mqtt import parse_broker_url
        from edgepack.host.cli.main import emit
        from edgepack.host.fleet.publish import publish_bundle

        cfg = parse_broker_url(broker, ca=ca, cert=cert, key=client_key, username=username,
                               password=password)
        result = publish_bundle(bundle, cfg, key_path=key, fleet=fleet, force=force,
                                chunk_size=chunk_kb * 1024 if chunk_kb else None)

        def render(r: dict) -> None:
            what = "already published" if r["skipped"] else (
                f"published {r['chunks']} chunks of {r['chunk_size'] // 1024} KiB")
            sig = f"table signed by key {r['key_id']}" if r["signed"] else \
                "UNSIGNED table (devices need allow_unsigned)"
            click.echo(f"{r['name']} {r['version']} ({r['bundle_id'][:12]}): {what} to "
                       f"{r['broker']}, fleet {r['fleet']}; {sig} [{r['seconds']:.2f}s]")
            click.echo(f"bundle id: {r['bundle_id']}")

        emit(result, as_json, render)
