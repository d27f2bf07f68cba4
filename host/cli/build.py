"""CLI: ``targets``, ``keys``, ``build``, ``inspect``, ``verify``."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["register"]


class TargetType(click.ParamType):
    """A shipped target name or a path to a profile .toml; unknown names list the known ones."""

    name = "target"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from edgepack.agent.profiles import list_targets

        if isinstance(value, str) and (value.endswith(".toml") or value in list_targets()):
            return value
        self.fail(f"unknown target {value!r}. Known targets: {', '.join(list_targets())} "
                  "(or a path to a profile .toml)", param, ctx)


def _console() -> Any:
    from rich.console import Console

    return Console()


@click.group("targets")
def targets() -> None:
    """Device profiles shipped with edgepack."""


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets_list(as_json: bool) -> None:
    """List the known targets."""
    from edgepack.agent.profiles import list_targets, load_profile
    from edgepack.host.cli.main import emit

    rows = []
    for name in list_targets():
        p = load_profile(name)
        rows.append({"name": name, "description": p.description, "cpu": p.hardware.cpu,
                     "ram_mb": p.hardware.ram_mb, "formats": list(p.runtime.formats),
                     "quantize": p.quantization.default})

    def render(rows: list[dict]) -> None:
        from rich.table import Table

        t = Table("target", "cpu", "RAM MB", "formats", "default", "description")
        for r in rows:
            t.add_row(r["name"], r["cpu"], f"{r['ram_mb']:g}", ",".join(r["formats"]),
                      r["quantize"], r["description"])
        _console().print(t)

    emit(rows, as_json, render)


@targets.command("show")
@click.argument("target", type=TargetType())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets_show(target: str, as_json: bool) -> None:
    """Show one target's profile."""
    from edgepack.agent.profiles import load_profile
    from edgepack.host.cli.main import emit

    p = load_profile(target)

    def render(d: dict) -> None:
        from rich.pretty import Pretty

        _console().print(f"[bold]{p.name}[/bold] — {p.description}")
        _console().print(Pretty(d))

    emit(p.to_dict(), as_json, render)


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(bundle: str, as_json: bool) -> None:
    """Show a bundle's manifest and build report."""
    import json

    from edgepack.agent.bundle import read_bundle
    from edgepack.host.cli.main import emit

    b = read_bundle(bundle)
    report = json.loads(b.read_member("report.json")) if "report.json" in b.manifest["files"] \
        else {}
    out = {"bundle_id": b.bundle_id, "bytes": b.size,
           "signed_by": (b.signature or {}).get("key_id"), "manifest": b.manifest,
           "report": report}

    def render(d: dict) -> None:
        from edgepack.host.build.report import render_bundle

        render_bundle(d, _console())

    emit(out, as_json, render)


@click.command("verify")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--pub", "pubs", multiple=True, required=True, type=click.Path(exists=True),
              help="Trusted public key(s) (fleet.pub).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(bundle: str, pubs: tuple[str, ...], as_json: bool) -> None:
    """Check a bundle's structure, every member hash and its signature."""
    from edgepack.agent.bundle import read_bundle
    from edgepack.agent.signing import load_public_keys
    from edgepack.host.cli.main import emit

    b = read_bundle(bundle)
    kid = b.verify(load_public_keys(pubs))
    out = {"ok": True, "bundle_id": b.bundle_id, "key_id": kid, "name": b.name,
           "version": b.version, "target": b.target}
    emit(out, as_json, lambda d: click.echo(
        f"OK  {d['name']} {d['version']} for {d['target']}  id {d['bundle_id'][:16]}  "
        f"signed by {d['key_id']}"))


def register(main: click.Group) -> None:
    """Add the build-side commands to the ``edgepack`` group."""
    from edgepack.host.cli.keys import keys

    for cmd in (targets, keys, inspect_cmd, verify_cmd):
        main.add_command(cmd)
    from edgepack.host.cli.build_cmd import build

    main.add_command(build)


