"""CLI: ``edgepack capture start|stop|pull --device D``: sampled capture of a device's inputs
and outputs (opt-in; ``docs/drift.md`` § Sampled capture)."""

from __future__ import annotations

from typing import Any

import click

from edgepack.host.cli.options import broker_options

__all__ = ["register"]

_KEY_HELP = ("Release key that signs the request (default: $EDGEPACK_KEY, then "
             "./keys/fleet.key).")


def _common(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed([
        click.option("--device", required=True, help="The device id."),
        broker_options,
        click.option("--key", type=click.Path(exists=True, dir_okay=False), help=_KEY_HELP),
        click.option("--fleet", default="default", show_default=True),
        click.option("--json", "as_json", is_flag=True),
    ]):
        f = opt(f)
    return f


def _say(obj: dict, as_json: bool, text: str) -> None:
    from edgepack.host.cli.main import emit

    emit(obj, as_json, lambda _: click.echo(text))


def register(main: click.Group) -> None:
    """Add ``capture`` to the ``edgepack`` group."""

    @main.group("capture")
    def capture() -> None:
        """Sampled capture of inputs and outputs on a device (off unless started)."""

    @capture.command("start")
    @_common
    @click.option("--rate", type=click.FloatRange(0, 1, min_open=True), default=0.01,
                  show_default=True, help="Fraction of inferences to record.")
    @click.option("--max-mb", type=click.FloatRange(0.001, 1024), default=20.0,
                  show_default=True, help="Bound of the on-device ring (oldest dropped).")
    @click.option("--max-records", type=click.IntRange(1, 1_000_000), default=10_000,
                  show_default=True, help="Bound of the ring in records.")
    @click.option("--until", help="Stop by itself after a duration (90m, 12h, 7d) or at an "
                                  "ISO 8601 time (default 24h, at most 30 days).")
    @click.option("--keep-days", type=click.FloatRange(0, 365), default=7.0, show_default=True,
                  help="Records are deleted this long after --until unless purged sooner.")
    def start(device: str, broker_cfg: Any, key: str | None, fleet: str, as_json: bool,
              rate: float, max_mb: float, max_records: int, until: str | None,
              keep_days: float) -> None:
        """Ask a device to record a sampled fraction of its inferences."""
        from edgepack.host.fleet import capture as cap

        r = cap.start(device, broker=broker_cfg, key=key, fleet=fleet, rate=rate,
                      max_mb=max_mb, max_records=max_records, until=until, keep_days=keep_days)
        _say(r.to_json(), as_json, f"capture requested on {device}: {rate:g} of inferences, "
             f"at most {max_mb:g} MB, until {_when(r.expires)} (v{r.version})")

    @capture.command("stop")
    @_common
    @click.option("--purge", is_flag=True, help="Delete every record the device holds.")
    def stop(device: str, broker_cfg: Any, key: str | None, fleet: str, as_json: bool,
             purge: bool) -> None:
        """Ask a device to stop capturing (and with --purge to delete its records)."""
        from edgepack.host.fleet import capture as cap

        r = cap.stop(device, broker=broker_cfg, key=key, fleet=fleet, purge=purge)
        _say(r.to_json(), as_json, f"capture stop{' and purge' if purge else ''} requested on "
             f"{device} (v{r.version})")

    @capture.command("pull")
    @_common
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="Directory for one npz per record and index.json.")
    @click.option("--timeout", type=click.FloatRange(1), default=120.0, show_default=True)
    @click.option("--max-mb", type=click.FloatRange(0.001), default=1024.0, show_default=True,
                  help="Refuse a capture larger than this.")
    @click.option("--device-key", type=click.Path(exists=True, dir_okay=False),
                  help="The device's enrollment JSON ({\"keyid\", \"key\"}): refuse a "
                       "capture that key did not sign.")
    @click.option("--db", "db_url", metavar="URL",
                  help="Fleet database to look the device's enrolled key up in, when "
                       "--device-key is not given (default: ./fleet.db if it exists).")
    def pull(device: str, broker_cfg: Any, key: str | None, fleet: str, as_json: bool,
             out: str, timeout: float, max_mb: float, device_key: str | None,
             db_url: str | None) -> None:
        """Fetch the records a device captured (they are the device's: only as honest as it)."""
        import json
        from pathlib import Path

        from edgepack.agent.errors import EdgepackError
        from edgepack.host.fleet import capture as cap

        try:
            enrolled = json.loads(Path(device_key).read_text()) if device_key else None
        except (OSError, ValueError) as exc:
            raise EdgepackError(f"cannot read the device key {device_key}: {exc}",
                                field="device_key") from None
        if enrolled is None:
            from edgepack.host.fleet.identity import inventory_keys

            enrolled = inventory_keys(db_url, fleet, [device]).get(device)
        r = cap.pull(device, broker=broker_cfg, out=out, key=key, fleet=fleet,
                     timeout=timeout, max_mb=max_mb, device_key=enrolled)
        signed = (f"{'verified' if r.verified else 'signed'} by device key {r.signed_by[:16]}"
                  if r.signed_by else "not signed")
        _say(r.to_json(), as_json, f"{r.records} record(s) from {device} in {r.out} "
             f"({r.bytes} bytes, {signed}; index {r.index})")


def _when(ts: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
