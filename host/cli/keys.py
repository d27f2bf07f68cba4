"""CLI: ``keys`` — make a fleet's keys, rotate any of them (root included), show the root,
publish the root chain devices walk (docs/security.md, key rotation)."""

from __future__ import annotations

from typing import Any

import click

from edgepack.host.cli.options import broker_options, fleet_option

__all__ = ["keys"]


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


@keys.command("rotate")
@click.option("--role", type=click.Choice(["root", "release", "online"]), required=True,
              help="The role whose keys are replaced.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, exists=True),
              default="keys", show_default=True, help="Folder holding root.json.")
@click.option("--count", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many new keys the role gets (n).")
@click.option("--threshold", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many of them must sign (k).")
@click.option("--root-key", "root_keys", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A current root key that signs the new root (repeat up to the threshold; "
              "default: the root keys found in --keys).")
@click.option("--publish", is_flag=True,
              help="Also retain the root chain on the broker (as `keys publish-root`).")
@broker_options
@fleet_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_rotate(role: str, keys_dir: str, count: int, threshold: int,
                root_keys: tuple[str, ...], publish: bool, broker_cfg: Any, fleet_name: str,
                as_json: bool) -> None:
    """Replace a role's keys: root metadata N+1, signed by root N's threshold (and, for the
    root role, by the new root keys). Devices walk to it once it is published."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.keyring import rotate_keys

    rot = rotate_keys(keys_dir, role, count=count, threshold=threshold, root_keys=root_keys)
    out = rot.to_json()
    if publish:
        from edgepack.host.fleet.root_publish import publish_root

        out["published"] = publish_root(keys_dir, broker=broker_cfg, fleet=fleet_name).to_json()

    def render(r: dict) -> None:
        click.echo(f"root v{r['from_version']} -> v{r['to_version']}: {role} keys now "
                   f"{', '.join(k['name'] + ' ' + k['key_id'][:16] for k in r['new_keys'])} "
                   f"({r['threshold']} of {len(r['new_keys'])})")
        if r["removed_key_ids"]:
            click.echo("removed: " + ", ".join(k[:16] for k in r["removed_key_ids"]))
        if role == "release":
            click.echo(f"sign with: --key {r['new_keys'][0]['private']}")
        if "published" in r:
            click.echo("published: " + ", ".join(r["published"]["topics"]))
        else:
            click.echo(f"devices pick it up once published: edgepack keys publish-root --keys "
                       f"{keys_dir} --broker URL")

    emit(out, as_json, render)


@keys.command("show")
@click.option("--keys", "keys_dir", type=click.Path(exists=True), default="keys",
              show_default=True, help="Folder holding root.json, or a root.json file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_show(keys_dir: str, as_json: bool) -> None:
    """Roles, key ids, thresholds and expiry of the fleet's root."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.keyring import describe_root

    info = describe_root(keys_dir)

    def render(r: dict) -> None:
        click.echo(f"root v{r['version']}  expires {r['expires']}  chain "
                   f"{', '.join(map(str, r['history']))}")
        for role, d in r["roles"].items():
            keys_ = ", ".join(f"{n or '?'} {k[:16]}" for k, n in zip(d["key_ids"], d["names"],
                                                                     strict=True))
            click.echo(f"  {role:8} {d['threshold']} of {len(d['key_ids'])}: {keys_}")
        click.echo("  signed by " + ", ".join(k[:16] for k in r["signed_by"]))

    emit(info.to_json(), as_json, render)


@keys.command("publish-root")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, exists=True),
              default="keys", show_default=True, help="Folder holding the root versions.")
@broker_options
@fleet_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_publish_root(keys_dir: str, broker_cfg: Any, fleet_name: str, as_json: bool) -> None:
    """Retain every root version on root/{N}: devices walk from theirs to the newest."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.root_publish import publish_root

    pub = publish_root(keys_dir, broker=broker_cfg, fleet=fleet_name)
    emit(pub.to_json(), as_json, lambda r: click.echo(
        f"published root v{', v'.join(map(str, r['versions']))} to fleet {r['fleet']} on "
        f"{r['broker']}"))
