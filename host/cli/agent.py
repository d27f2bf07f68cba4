"""CLI: ``edgepack agent init`` (write a device's agent.toml) and ``edgepack publish``."""

from __future__ import annotations

import click

from edgepack.host.cli.options import raw_broker_options
from edgepack.host.fleet.provision import BOARDS, board_template

__all__ = ["register", "BOARDS", "board_template"]


# the broker flags every command shares (``profile`` imports this name too)
_broker_options = raw_broker_options


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
    @click.option("--root", type=click.Path(exists=True, dir_okay=False),
                  help="The fleet's root.json (edgepack keys init): the keys and thresholds "
                  "of protocol v2. Without it the device derives its root from --pub.")
    @click.option("--force", is_flag=True, help="Overwrite an existing config.")
    @click.option("--json", "as_json", is_flag=True)
    def init(board: str, device_id: str, broker: str, ca: str | None, cert: str | None,
             client_key: str | None, username: str | None, password: str | None,
             pubs: tuple[str, ...], data_dir: str, out: str, target: str | None,
             groups: tuple[str, ...], fleet: str, allow_unsigned: bool, root: str | None,
             force: bool, as_json: bool) -> None:
        """Write agent.toml for a device and make its key (start it with: edgepack-agent
        --config OUT; enroll the enrollment.json written next to it with edgepack fleet
        enroll)."""
        from edgepack.host.cli.main import emit
        from edgepack.host.cli.options import broker_config
        from edgepack.host.fleet.provision import init_agent

        cfg = broker_config(broker, ca=ca, cert=cert, cert_key=client_key, username=username,
                            password=password)
        result = init_agent(board, device_id, broker=cfg, out=out, pub=pubs,
                            data_dir=data_dir, target=target, groups=groups, fleet=fleet,
                            allow_unsigned=allow_unsigned, root=root, force=force).to_json()

        def render(r: dict) -> None:
            click.echo(f"wrote {r['config']} for {r['device_id']} ({board}, target "
                       f"{r['target']}, fleet {r['fleet']})")
            click.echo(f"trusts {r['trust_root'] or 'a root derived from its trusted keys'} "
                       "for signed desired states (protocol v2)")
            click.echo(f"device key {r['enrollment']['keyid'][:16]} in {r['data_dir']}; "
                       f"enroll it on the fleet server: edgepack fleet enroll "
                       f"{r['enrollment_file']}")
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
        from edgepack.host.cli.main import emit
        from edgepack.host.cli.options import broker_config
        from edgepack.host.fleet.api import publish

        cfg = broker_config(broker, ca=ca, cert=cert, cert_key=client_key, username=username,
                            password=password)
        result = publish(bundle, broker=cfg, key=key, fleet=fleet, force=force,
                         chunk_size=chunk_kb * 1024 if chunk_kb else None).to_json()

        def render(r: dict) -> None:
            what = "already published" if r["skipped"] else (
                f"published {r['chunks']} chunks of {r['chunk_size'] // 1024} KiB")
            sig = f"table signed by key {r['key_id']}" if r["signed"] else \
                "UNSIGNED table (devices need allow_unsigned)"
            click.echo(f"{r['name']} {r['version']} ({r['bundle_id'][:12]}): {what} to "
                       f"{r['broker']}, fleet {r['fleet']}; {sig} [{r['seconds']:.2f}s]")
            click.echo(f"bundle id: {r['bundle_id']}")

        emit(result, as_json, render)
