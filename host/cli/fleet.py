"""CLI: ``deploy``, ``fleet status`` and ``broker`` (the embedded one, for a one-machine trial).

Every command that talks to a broker takes the same options (:func:`broker_options`):
``--broker mqtt[s]://host:port`` plus ``--ca/--cert/--cert-key`` for TLS client certificates and
``--username/--password``. ``--key`` is always the fleet *signing* key, never a TLS key.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import click

from edgepack.host.cli.flags import as_flags
from edgepack.host.cli.options import broker_options, check_id, fleet_option

__all__ = ["register", "until_signal", "fleet", "deploy_cmd", "broker_cmd"]


@contextlib.contextmanager
def until_signal() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM while the block runs (long-running commands stop
    cleanly instead of dying mid-write); the previous handlers come back after."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _console() -> Any:
    from rich.console import Console

    return Console()


# -- deploy ---------------------------------------------------------------------------------

@click.command("deploy")
@click.argument("bundle_or_id")
@click.option("--device", callback=check_id("device id"), help="Deploy to this device.")
@click.option("--group", callback=check_id("group name"),
              help="Deploy to every device of this group.")
@broker_options
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False),
              help="Release key (fleet.key, or release.key of `keys init`): signs the desired "
              "state (protocol v2) and publishes a bundle file not yet published. Default: "
              "$EDGEPACK_KEY, else ./keys/fleet.key.")
@fleet_option
@click.option("--allow-downgrade", is_flag=True,
              help="Let the device install a version older than its rollback floor (a signed "
              "downgrade authorization for --device).")
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS",
              help="With --device: wait until the device runs the bundle (or reports failure).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def deploy_cmd(bundle_or_id: str, device: str | None, group: str | None, broker_cfg: Any,
               key_path: str | None, fleet_name: str, allow_downgrade: bool,
               wait_s: float | None, as_json: bool) -> None:
    """Point a device or a group at a bundle (a .edgepack file, or the id of a published one).

    A bundle file the broker does not hold yet is published first (signed with --key). The
    desired state is signed with --key (protocol v2); without any key it is unsigned (v1),
    which only development devices (allow_unsigned) accept.
    """
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.api import deploy

    if (device is None) == (group is None):
        raise click.UsageError("give exactly one of --device or --group")
    if wait_s is not None and device is None:
        raise click.UsageError("--wait needs --device")
    where = f"device {device}" if device else f"group {group}"
    if wait_s is None or as_json:
        result = deploy(bundle_or_id, broker=broker_cfg, device=device, group=group,
                        fleet=fleet_name, key=key_path, allow_downgrade=allow_downgrade,
                        wait=wait_s)
    else:  # people see the deployment before the wait
        result = deploy(bundle_or_id, broker=broker_cfg, device=device, group=group,
                        fleet=fleet_name, key=key_path, allow_downgrade=allow_downgrade)
    if not as_json:
        click.echo(f"deployed {result.name} {result.version} ({result.bundle_id[:12]}) to "
                   f"{where} in fleet {fleet_name}: deployment {result.deployment_id}"
                   + (" (bundle published first)" if result.published else ""))
        for w in result.warnings:
            click.echo(f"warning: {as_flags(w)}", err=True)
        if wait_s is not None:
            from edgepack.host.fleet.deploy import wait_for_deployment

            t0 = time.monotonic()
            wait_for_deployment(broker_cfg, result, timeout=wait_s)
            click.echo(f"device {device} runs {result.name} {result.version} "
                       f"(after {time.monotonic() - t0:.1f}s)")
        return
    for w in result.warnings:  # scripts read them in the JSON; people watching see them too
        click.echo(f"warning: {as_flags(w)}", err=True)
    emit(result.to_json(), True)


# -- fleet status ---------------------------------------------------------------------------

@click.group("fleet")
def fleet() -> None:
    """Devices of a fleet: what they run and how they are."""


@fleet.command("clear")
@click.option("--device", callback=check_id("device id"),
              help="Clear this device's own desired state (it follows its groups again).")
@click.option("--group", callback=check_id("group name"), help="Clear a group's.")
@broker_options
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False),
              help="Release key that signs the clear (default: $EDGEPACK_KEY, else "
              "./keys/fleet.key).")
@fleet_option
def clear_cmd(device: str | None, group: str | None, broker_cfg: Any, key_path: str | None,
              fleet_name: str) -> None:
    """Clear a desired state with a signed empty one (protocol v2)."""
    from edgepack.host.fleet.deploy import clear_desired

    if (device is None) == (group is None):
        raise click.UsageError("give exactly one of --device or --group")
    topic, signed = clear_desired(broker=broker_cfg, device=device, group=group,
                                  fleet=fleet_name, key=key_path)
    click.echo(f"cleared {topic}" + ("" if signed else " (unsigned: only development devices "
                                     "accept it; pass --key)"))


@fleet.command("status")
@broker_options
@fleet_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fleet_status_cmd(broker_cfg: Any, fleet_name: str, as_json: bool) -> None:
    """One line per device: presence, board, target, active bundle, slot, last report."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.api import fleet_status

    rows = [r.to_json() for r in fleet_status(broker=broker_cfg, fleet=fleet_name)]

    def render(rows: list[dict]) -> None:
        from rich import box
        from rich.table import Table

        if not rows:
            click.echo(f"no device has reported in fleet {fleet_name} on {broker_cfg.url}")
            return
        t = Table(title=f"fleet {fleet_name} on {broker_cfg.url}", box=box.SIMPLE_HEAD)
        # the device id is the key people copy: keep it whole, squeeze the other columns
        t.add_column("device", overflow="fold",
                     min_width=min(32, max(len(r["device"]) for r in rows)))
        t.add_column("status")
        t.add_column("board")
        t.add_column("bundle")
        t.add_column("id", no_wrap=True)
        t.add_column("slot")
        t.add_column("desired")
        t.add_column("last seen")
        colour = {"online": "green", "offline": "red"}
        for r in rows:
            bundle = " ".join(x for x in (r["bundle_name"], r["bundle_version"]) if x) or "-"
            d = r["desired"]
            desired = "-" if d is None else "in sync" if r["in_sync"] else \
                f"→ {d['name']} {d['version']}"
            status = r["status"] + (" (bad state)" if r.get("error") else "")
            board = r["board"] or r["target"] or "-"
            if r["target"] and r["target"] != board:
                board += f" ({r['target']})"
            t.add_row(r["device"], f"[{colour.get(r['status'], 'yellow')}]{status}[/]",
                      board, bundle, (r["bundle_id"] or "-")[:8], str(r["slot"] or "-"),
                      desired, _ago(r["age_s"]))
        _console().print(t)
        online = sum(r["status"] == "online" for r in rows)
        click.echo(f"{len(rows)} devices, {online} online")

    emit(rows, as_json, render)


# -- inventory: enroll, revoke, devices ----------------------------------------------------

_db_option = click.option("--db", "db_url", default="sqlite:///fleet.db", show_default=True,
                          envvar="EDGEPACK_DB", help="Fleet database (the one 'fleet serve' "
                          "uses; env EDGEPACK_DB).")


def _enrollment_doc(file: str | None, key: str | None) -> dict[str, Any]:
    """The enrollment object of FILE, or of ``--key`` (a key file, or its JSON inline)."""
    import json
    from pathlib import Path

    from edgepack.host.fleet.identity import enrollment_of_key, read_enrollment

    if (file is None) == (key is None):
        raise click.UsageError("give an enrollment file (agent init wrote it) or --device and "
                               "--key")
    if file is not None:
        return read_enrollment(file)
    assert key is not None
    try:
        doc = read_enrollment(key) if Path(key).is_file() else json.loads(key)
    except ValueError:
        raise click.BadParameter("neither a file nor a JSON key object", param_hint="--key") \
            from None
    if isinstance(doc, dict) and "key" not in doc:  # a bare public key object
        doc = enrollment_of_key(doc)
    return doc


@fleet.command("enroll")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--device", callback=check_id("device id"),
              help="Device id (default: the enrollment file's).")
@click.option("--key", help="The device's public key: its enrollment.json, or the JSON inline.")
@click.option("--group", "groups", multiple=True,
              help="Group the device belongs to; repeatable (default: the file's groups).")
@fleet_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def enroll_cmd(file: str | None, device: str | None, key: str | None, groups: tuple[str, ...],
               fleet_name: str, db_url: str, as_json: bool) -> None:
    """Enroll a device's key: only its signed reports count, in the groups given here."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.identity import enroll
    from edgepack.host.fleet.storage import open_store

    doc = _enrollment_doc(file, key)
    with open_store(db_url) as store:
        rec = enroll(store, doc, fleet=fleet_name, device=device,
                     groups=list(groups) if groups else None)
    emit(rec.to_json(), as_json, lambda r: click.echo(
        f"enrolled {r['device_id']} in fleet {r['fleet']} with key {r['key_id'][:16]} "
        f"(groups: {', '.join(r['groups']) or 'none'})"))


@fleet.command("revoke")
@click.option("--device", required=True, callback=check_id("device id"),
              help="The device whose key is no longer believed.")
@fleet_option
@_db_option
def revoke_cmd(device: str, fleet_name: str, db_url: str) -> None:
    """Revoke a device: its reports count for nothing and it leaves its groups."""
    from edgepack.host.fleet.identity import revoke
    from edgepack.host.fleet.storage import open_store

    with open_store(db_url) as store:
        rec = revoke(store, device, fleet=fleet_name)
    click.echo(f"revoked {rec.device_id} (key {rec.key_id[:16]}) in fleet {rec.fleet}")


@fleet.command("devices")
@fleet_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices_cmd(fleet_name: str, db_url: str, as_json: bool) -> None:
    """The inventory: enrolled devices, their key ids and groups, and devices seen but not
    enrolled (their reports count for nothing)."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.storage import open_store

    with open_store(db_url) as store:
        enrolled = {r.device_id: r for r in store.inventory.list(fleet_name)}
        seen = {d.device_id: d for d in store.devices.list(fleet_name)}
    rows = []
    for dev in sorted(set(enrolled) | set(seen)):
        e, d = enrolled.get(dev), seen.get(dev)
        rows.append({
            "device_id": dev, "enrolled": e is not None and not e.revoked,
            "revoked": bool(e and e.revoked), "key_id": e.key_id if e else None,
            "groups": list(e.groups) if e else [],
            "claimed_groups": list(d.claimed_groups) if d else [],
            "authenticated": bool(d and d.authenticated),
            "unauthenticated": d.unauthenticated if d else 0,
            "enrolled_at": e.enrolled_at if e else None})

    def render(rows: list[dict]) -> None:
        if not rows:
            click.echo(f"no device enrolled or seen in fleet {fleet_name}")
            return
        for r in rows:
            status = "revoked" if r["revoked"] else "enrolled" if r["enrolled"] else \
                "NOT ENROLLED"
            click.echo(f"{r['device_id']}  {status}  key {(r['key_id'] or '-')[:16]}  groups "
                       f"{','.join(r['groups']) or '-'}  unauthenticated reports "
                       f"{r['unauthenticated']}")

    emit(rows, as_json, render)


# -- broker ---------------------------------------------------------------------------------

@click.command("broker")
@click.option("--port", type=click.IntRange(0, 65535), default=1883, show_default=True,
              help="TCP port (0 picks a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the broker to the network.")
def broker_cmd(port: int, host: str) -> None:
    """Run an embedded MQTT broker for a one-machine trial, until Ctrl-C or SIGTERM.

    Anonymous, unencrypted and in memory: for trials and development. Use Mosquitto with the
    config in firmware_configs/mosquitto/ for a real fleet.
    """
    from edgepack.agent.errors import BrokerError
    from edgepack.host.fleet.broker import EmbeddedBroker, is_loopback

    with until_signal() as stop, EmbeddedBroker(host, port) as b:
        if not is_loopback(host):
            click.echo(f"warning: listening on {host} without authentication or TLS: "
                       "anyone who can reach this port can deploy to your devices", err=True)
        click.echo(f"edgepack broker listening on mqtt://{host}:{b.port} "
                   "(MQTT 3.1.1, in memory; Ctrl-C to stop)")
        while not stop.wait(0.5):
            if not b.running:
                raise BrokerError("the embedded broker stopped unexpectedly")
    click.echo("broker stopped")


def register(main: click.Group) -> None:
    """Add ``deploy``, ``fleet`` and ``broker`` to the ``edgepack`` group."""
    for cmd in (deploy_cmd, fleet, broker_cmd):
        main.add_command(cmd)
