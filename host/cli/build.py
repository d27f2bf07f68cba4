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


@click.group("keys")
def keys() -> None:
    """Fleet signing keys (Ed25519)."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="keys",
              show_default=True)
@click.option("--name", default="fleet", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keys_generate(out_dir: str, name: str, force: bool) -> None:
    """Write NAME.key (private, mode 0600) and NAME.pub (give this to devices).

    The one-machine path: NAME.key signs bundles and desired states; devices given NAME.pub
    derive their trusted root from it. A fleet with offline root keys: `keys init`.
    """
    from edgepack.host.keys import generate_keys

    priv, pub, kid = generate_keys(out_dir, name, overwrite=force)
    click.echo(f"private key {priv} (signs bundles and desired states; keep it on the build "
               f"machine)\npublic key  {pub}\nkey id      {kid}")


@keys.command("init")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="keys",
              show_default=True)
@click.option("--root-keys", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many offline root keys (n).")
@click.option("--root-threshold", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many of them must sign a new root (k).")
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.option("--json", "as_json", is_flag=True)
def keys_init(out_dir: str, root_keys: int, root_threshold: int, force: bool,
              as_json: bool) -> None:
    """Protocol v2 keys: root (k of n, offline), release, online, and root.json."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.keyring import init_fleet_keys

    fk = init_fleet_keys(out_dir, root_keys=root_keys, root_threshold=root_threshold,
                         overwrite=force)

    def render(r: dict) -> None:
        click.echo(f"root.json   {r['root']} ({r['root_threshold']} of "
                   f"{len(r['root_keys'])} root keys; keep root-*.key offline, apart)")
        click.echo(f"release key {r['release']['private']} (build --key, deploy --key)")
        click.echo(f"online key  {r['online']['private']} (the fleet server's)")
        click.echo(f"devices:    edgepack agent init --pub {r['release_pem']} --root "
                   f"{r['root']} ...")

    emit(fk.to_json(), as_json, render)


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
    for cmd in (targets, keys, inspect_cmd, verify_cmd):
        main.add_command(cmd)
    from edgepack.host.cli.build_cmd import build

    main.add_command(build)


