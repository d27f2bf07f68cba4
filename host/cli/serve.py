"""CLI: ``fleet serve``, ``fleet simulate``, ``rollout start|status|list|pause|resume|abort``, and
the staged options of ``deploy`` (``--stages``, ``--max-failures``, ``--soak``).

Flags in, library calls (:mod:`edgepack.host.fleet.api`, :mod:`edgepack.host.fleet.server`),
rendering out. ``register(main)`` must run after ``cli.fleet.register(main)``: it adds commands
to the existing ``fleet`` group and extends the existing ``deploy`` command.
"""

from __future__ import annotations

import time
from typing import Any

import click

from edgepack.host.cli.flags import as_flags
from edgepack.host.cli.fleet import until_signal
from edgepack.host.cli.options import broker_config, broker_options, fleet_option

__all__ = ["register", "rollout", "serve_cmd", "simulate_cmd"]

_DB_DECLS = ("--db", "db_url")
_DB_ATTRS: dict[str, Any] = {
    "default": "sqlite:///fleet.db", "show_default": True, "envvar": "EDGEPACK_DB",
    "help": "Fleet database: sqlite:///fleet.db (default) or postgresql://user@host/db "
            "(env EDGEPACK_DB)."}
_db_option = click.option(*_DB_DECLS, **_DB_ATTRS)


def _duration(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    from edgepack.host.fleet.rollout import RolloutError, parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except RolloutError as exc:
        raise click.BadParameter(str(exc)) from None


def _hostport(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        host = "127.0.0.1"
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)") from None


# ------------------------------------------------------------------------------ fleet serve

@click.command("serve")
@broker_options
@_db_option
@click.option("--http", "http", default="127.0.0.1:8080", show_default=True,
              callback=_hostport, help="Address of the dashboard, API and /metrics (port 0: any "
              "free port).")
@click.option("--fleet", "fleets", multiple=True, default=("default",), show_default=True,
              envvar="EDGEPACK_FLEET", help="Fleet(s) to collect (repeat for several).")
@click.option("--retention", default="7d", show_default=True, callback=_duration,
              help="Keep telemetry this long (30s, 10m, 12h, 7d).")
@click.option("--events-retention", default="90d", show_default=True, callback=_duration,
              help="Keep install events this long.")
@click.option("--shared", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="MQTT 5 shared subscription for telemetry and events, so "
              "several collectors split a fleet (auto: when the broker offers it).")
@click.option("--queue-max", type=click.IntRange(1000, None), default=500_000,
              show_default=True, help="Messages held in memory while the database is "
              "unavailable; past it, new telemetry is dropped (and counted).")
@click.option("--client-id", help="MQTT client id (stable across restarts by default, so the "
              "broker keeps our session and queues messages while we are away).")
@click.option("--no-rollouts", is_flag=True, help="Do not drive staged rollouts from this "
              "process.")
@click.option("--token", envvar="EDGEPACK_DASHBOARD_TOKEN",
              help="The API token ('Authorization: Bearer TOKEN', and the dashboard's login) "
              "instead of the one made in --data-dir (env EDGEPACK_DASHBOARD_TOKEN).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the generated API token is kept (fleet-token, 0600; default: next to "
              "a SQLite database, else ~/.local/state/edgepack).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A host name clients use to reach this server, besides the --http address "
              "and localhost (repeat for several); other Host headers get 421.")
@click.option("--public-reads/--private-reads", default=None,
              help="Whether GETs of the API and /metrics work without the token (default: "
              "public on a loopback --http, private otherwise).")
@click.option("--no-auth", is_flag=True, help="No token at all (only with a loopback --http).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Public key (.pub) bundle signatures are verified against before the "
              "dashboard names their signer (repeat for several).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def serve_cmd(broker_cfg: Any, db_url: str, http: tuple[str, int], fleets: tuple[str, ...],
              retention: float, events_retention: float, shared: str, queue_max: int,
              client_id: str | None, no_rollouts: bool, token: str | None,
              data_dir: str | None, allowed_hosts: tuple[str, ...], public_reads: bool | None,
              no_auth: bool, trusted_keys: tuple[str, ...], log_level: str) -> None:
    """Collect a fleet's telemetry, state and events into a database; serve the dashboard.

    Runs until Ctrl-C or SIGTERM. Staged rollouts started with 'edgepack deploy --stages'
    against the same database advance here.
    """
    import logging

    from edgepack.agent.errors import ProtocolError
    from edgepack.host.fleet.collector import CollectorOptions
    from edgepack.host.fleet.server import FleetServer, ServeConfig

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("paho").setLevel(logging.WARNING)
    try:
        opts = CollectorOptions(fleets=tuple(dict.fromkeys(fleets)), client_id=client_id,
                                shared=shared, queue_max=queue_max,
                                telemetry_retention_s=retention,
                                events_retention_s=events_retention)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="--fleet") from None
    config = ServeConfig(broker=broker_cfg, db=db_url, http=http, collector=opts,
                         rollouts=not no_rollouts, token=token, data_dir=data_dir,
                         auth=not no_auth, allowed_hosts=allowed_hosts,
                         public_reads=public_reads, trusted_keys=trusted_keys)
    with until_signal() as stop:
        server = FleetServer(config).start()
        try:
            for w in config.warnings():
                click.echo(f"warning: {as_flags(w)}", err=True)
            click.echo(f"edgepack fleet serve: collecting fleet(s) {', '.join(opts.fleets)} "
                       f"from {broker_cfg.url} into {server.store.safe_url}")
            click.echo(f"dashboard: {server.url}  (metrics: {server.url}metrics)")
            if server.token_file is not None:
                click.echo(f"API token: in {server.token_file} (log in with it on the "
                           "dashboard; 'Authorization: Bearer …' for the API)")
            elif server.token is None:
                click.echo("API token: none (--no-auth): anyone on this machine can change "
                           "rollouts")
            while not stop.wait(0.5):
                pass
            click.echo("stopping: storing what is queued…")
        finally:
            server.stop()
    click.echo("stopped")


# ------------------------------------------------------------------------------ fleet simulate

@click.command("simulate")
@click.option("--devices", "n", type=click.IntRange(1, 100_000), default=10, show_default=True,
              help="How many simulated devices.")
@broker_options
@fleet_option
@click.option("--target", default="rpi4", show_default=True,
              help="Target (device profile) the devices report and accept bundles for.")
@click.option("--board", help="Board name they report (default: the target).")
@click.option("--group", "groups", multiple=True, default=("sim",), show_default=True,
              help="Group(s) every device belongs to (repeat for several).")
@click.option("--prefix", default="sim", show_default=True, help="Device ids: PREFIX-0001 …")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of devices whose health check fails (they roll back).")
@click.option("--over-budget-rate", type=click.FloatRange(0, 1), default=0.0,
              show_default=True, help="Share of devices running over the bundle's latency "
              "and memory budgets once installed.")
@click.option("--interval", type=click.FloatRange(0.05, None), default=5.0, show_default=True,
              help="Seconds between telemetry messages of each device.")
@click.option("--install-time", type=click.FloatRange(0, None), default=1.5, show_default=True,
              help="Seconds a simulated health check takes.")
@click.option("--pub", "pubs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Trusted public key: check each chunk table's signature (repeatable).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds "
              "(default: until Ctrl-C).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Which devices misbehave, and the noise in their figures.")
@click.option("--db", "enroll_db", help="Enroll the devices' keys in this fleet database (the "
              "one 'fleet serve' uses), so their signed reports count.")
@click.option("--json", "as_json", is_flag=True, help="Print the final counters as JSON.")
def simulate_cmd(n: int, broker_cfg: Any, fleet_name: str, target: str, board: str | None,
                 groups: tuple[str, ...], prefix: str, fail_rate: float,
                 over_budget_rate: float, interval: float, install_time: float,
                 pubs: tuple[str, ...], duration: float | None, seed: int,
                 enroll_db: str | None, as_json: bool) -> None:
    """Run many simulated devices, each a real MQTT connection speaking the agent protocol.

    They announce themselves (retained state, LWT), follow deployments with the real chunk
    transfer, report install events and plausible telemetry; --fail-rate of them fail health
    checks. For demos, dashboards and scale tests.
    """
    from edgepack.agent.errors import ProtocolError
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet.simulator import SimOptions, Simulator

    try:
        opts = SimOptions(devices=n, fleet=fleet_name, target=target, board=board,
                          groups=tuple(groups), prefix=prefix, fail_rate=fail_rate,
                          over_budget_rate=over_budget_rate, interval_s=interval,
                          install_s=install_time, trusted_keys=tuple(pubs), seed=seed,
                          enroll_db=enroll_db)
    except (ValueError, ProtocolError) as exc:
        raise click.UsageError(str(exc)) from None
    with until_signal() as stop:
        sim = Simulator(broker_cfg, opts).start()
        try:
            t0 = time.monotonic()
            ok = sim.wait_online(timeout=max(30.0, n / 100.0))
            if not as_json:
                failing = sim.stats()["failing_health"]
                click.echo(f"{sim.online_count()}/{n} simulated {target} devices online in "
                           f"fleet {fleet_name} on {broker_cfg.url} (groups {', '.join(groups)}"
                           f"; {failing} fail health checks)"
                           f"{'' if ok else ' — some cannot connect'}")
            end = None if duration is None else t0 + duration
            while not stop.wait(0.5):
                if end is not None and time.monotonic() >= end:
                    break
        finally:
            sim.stop()
    stats = sim.stats()
    if as_json:
        emit(stats, True)
    else:
        c = stats["counters"]
        click.echo(f"stopped: {stats['telemetry_sent']} telemetry messages, "
                   f"{c.get('event_installed', 0)} installs, "
                   f"{c.get('event_health_failed', 0)} failed health checks")


# ------------------------------------------------------------------------------ rollouts

def _render_status(s: dict) -> None:
    click.echo(f"rollout {s['id']}: {s['state']} — {s['bundle_name']} {s['bundle_version']} "
               f"({s['bundle_id'][:12]}) to group {s['group_name']} in fleet {s['fleet']}")
    click.echo(f"stage {s['stage']}/{s['stage_count']}; failures {s['failures']} "
               f"({s['allowed_failures']} allowed: {s['max_failures']} of {s['deployed']} "
               f"deployed); soak {s['soak_s']:g}s"
               + (f", {s['soak_left_s']:.0f}s left" if "soak_left_s" in s else ""))
    cols = ("waiting", "pending", "downloading", "installing", "installed", "failed",
            "rolled_back")
    click.echo(f"  {'stage':>5} {'%':>5} {'devices':>7}  {'phase':<13}"
               + "".join(f"{c.replace('_', ' '):>12}" for c in cols))
    for st in s["stages"]:
        click.echo(f"  {st['stage']:>5} {st['percent']:>5g} {st['devices']:>7}  "
                   f"{st['phase']:<13}" + "".join(f"{st['counts'].get(c, 0):>12}" for c in cols))
    halt = s.get("halt")
    if halt:
        click.echo(f"halt reason (stage {halt.get('stage')}, {halt.get('metric')}): "
                   f"{halt.get('message')}")
    elif s.get("comparison"):
        click.echo(f"stage {s['comparison']['stage']} vs {s['comparison']['compared_with']} and "
                   "the previous bundle:")
        for c in s["comparison"]["checks"]:
            click.echo(f"  {c['verdict']:<12} {c['message']}")
    for line in s["log"][-8:]:
        click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(line['ts']))} "
                   f"{line['message']}")


def _start(db_url: str, broker_cfg: Any, bundle: str, *, group: str, fleet_name: str,
           stages: str, max_failures: str, soak: str, stage_timeout: str, key_path: str | None,
           allow_downgrade: bool, devices: str | None, as_json: bool,
           **checks: Any) -> None:
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet import api
    from edgepack.host.fleet.storage import open_store

    with open_store(db_url) as store:
        status = api.rollout_start(
            bundle, group=group, broker=broker_cfg, db=store, fleet=fleet_name, stages=stages,
            max_failures=max_failures, soak=soak, stage_timeout=stage_timeout, key=key_path,
            allow_downgrade=allow_downgrade,
            devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else None,
            **checks)
        running = api.collectors_alive(db=store) > 0
        where = store.safe_url
    s = status.to_json()
    if as_json:
        emit({**s, "collector_running": running}, True)
        return
    pcts = ", ".join(f"{st.percent:g}%" for st in status.stages)
    click.echo(f"rollout {status.id} planned: {s['bundle_name']} {s['bundle_version']} to "
               f"{sum(st.devices for st in status.stages)} devices of group {group} in "
               f"stages {pcts}")
    if not running:
        click.echo(f"warning: no 'edgepack fleet serve' has written to {where} in the "
                   "last minute; the rollout advances only while one runs on this database",
                   err=True)
    click.echo(f"watch it: edgepack rollout status {status.id} --db {where}")


@click.group("rollout")
def rollout() -> None:
    """Staged rollouts: start, watch, pause, resume, abort (state in the fleet database)."""


_CHECKS = ("max_latency_regression", "max_error_rate_rise", "max_drift_score",
           "max_confidence_drop", "baseline_group", "rollback_on_halt")


def _check_options() -> list[click.Option]:
    """The options of what a stage is compared on (``rollout start`` and ``deploy --stages``)."""
    return [
        click.Option(["--max-latency-regression"], default="20%", show_default=True,
                     help="Halt when the stage's median p95 latency rises more than this over "
                     "its previous bundle and the baseline."),
        click.Option(["--max-error-rate-rise"], default="1pt", show_default=True,
                     help="Halt when the error rate (failed / all inferences) rises more than "
                     "this many percentage points."),
        click.Option(["--max-drift-score"], default="1.0", show_default=True,
                     help="Halt when the stage's median drift score reaches this (1.0 = the "
                     "drift alert threshold) while the references stay below."),
        click.Option(["--max-confidence-drop"], default="5pt", show_default=True,
                     help="Halt when the mean top probability falls more than this."),
        click.Option(["--baseline-group"], default=None,
                     help="Compare with this group [default: the group's devices the rollout "
                     "has not reached]."),
        click.Option(["--rollback-on-halt/--no-rollback-on-halt"], default=True,
                     show_default=True, help="Send a halted stage back to its previous bundle."),
    ]


def _stage_options(prefix: str = "") -> list[click.Option]:
    """How a stage fails and how long it soaks (``rollout start``; ``deploy --stages`` with
    ``prefix`` "With --stages: ")."""
    def say(text: str) -> str:
        return prefix + (text[0].lower() + text[1:] if prefix else text)

    return [
        click.Option(["--max-failures"], default="5%", show_default=True,
                     help=say("Halt and roll back the stage past this many failed devices (3) "
                              "or this share of the devices deployed so far (5%).")),
        click.Option(["--soak"], default="10m", show_default=True,
                     help=say("How long a stage's telemetry must stay within the bundle's "
                              "budgets.")),
        click.Option(["--stage-timeout"], default="30m", show_default=True,
                     help=say("A device without an outcome this long after its stage started "
                              "fails.")),
    ]


def _with_checks(cmd: click.Command) -> click.Command:
    cmd.params.extend([*_stage_options(), *_check_options()])
    return cmd


@_with_checks
@rollout.command("start")
@click.argument("bundle")
@click.option("--group", required=True, help="The group to roll out to.")
@click.option("--stages", default="1,10,50,100", show_default=True,
              help="Cumulative percentages of the group per stage.")
@click.option("--devices", help="Comma-separated device ids instead of the group's members.")
@click.option("--id", "rollout_id", default=None,
              help="The rollout's id [default: ro-<time>-<random>].")
@broker_options
@_db_option
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False),
              help="Fleet signing key, to publish a bundle file not yet published.")
@fleet_option
@click.option("--allow-downgrade", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rollout_start_cmd(bundle: str, group: str, stages: str, max_failures: str, soak: str,
                      stage_timeout: str, devices: str | None, broker_cfg: Any, db_url: str,
                      key_path: str | None, fleet_name: str, allow_downgrade: bool,
                      as_json: bool, rollout_id: str | None, **checks: Any) -> None:
    """Plan a staged rollout of BUNDLE (a .edgepack file or a published bundle id).

    Each stage soaks, then is compared with its devices' previous bundle and a baseline
    group; it halts past the thresholds below (docs/rollouts.md)."""
    _start(db_url, broker_cfg, bundle, group=group, fleet_name=fleet_name, stages=stages,
           max_failures=max_failures, soak=soak, stage_timeout=stage_timeout,
           key_path=key_path, allow_downgrade=allow_downgrade, devices=devices,
           as_json=as_json, rollout_id=rollout_id, **checks)


@rollout.command("status")
@click.argument("rollout_id")
@_db_option
@click.option("--watch", is_flag=True, help="Print again every 2 s until the rollout ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rollout_status_cmd(rollout_id: str, db_url: str, watch: bool, as_json: bool) -> None:
    """Stages, per-status device counts and the log of a rollout."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet import api
    from edgepack.host.fleet.rollout import FINAL_STATES
    from edgepack.host.fleet.storage import open_store

    with open_store(db_url) as store:
        while True:
            s = api.rollout_status(rollout_id, db=store)
            emit(s.to_json(), as_json, _render_status)
            if not watch or s.state in FINAL_STATES:
                return
            time.sleep(2.0)
            click.echo()


@rollout.command("list")
@_db_option
@click.option("--fleet", "fleet_name", default=None, help="Only this fleet.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rollout_list_cmd(db_url: str, fleet_name: str | None, as_json: bool) -> None:
    """Rollouts, newest first."""
    from edgepack.host.cli.main import emit
    from edgepack.host.fleet import api

    rows = [r.to_json() for r in api.rollouts(db=db_url, fleet=fleet_name)]

    def render(rows: list[dict]) -> None:
        if not rows:
            click.echo("no rollout")
        for r in rows:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
            click.echo(f"{r['id']}  {r['state']:<15} {r['fleet']}/{r['group_name']}  "
                       f"{r['bundle_name']} {r['bundle_version']}  stage {r['stage'] + 1}/"
                       f"{len(r['stages'])}  {created}")
    emit(rows, as_json, render)


def _control(name: str, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @click.argument("rollout_id")
    @_db_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def cmd(rollout_id: str, db_url: str, as_json: bool, **kw: Any) -> None:
        from edgepack.host.cli.main import emit
        from edgepack.host.fleet import api

        if name == "abort":
            s = api.rollout_abort(rollout_id, db=db_url, rollback=not kw.get("no_rollback"))
        else:
            s = {"pause": api.rollout_pause, "resume": api.rollout_resume}[name](
                rollout_id, db=db_url)
        emit(s.to_json(), as_json, _render_status)
    if name == "abort":
        cmd = click.option("--no-rollback", is_flag=True,
                           help="Stop without rolling devices back.")(cmd)
    return cmd


for _name, _doc in (("pause", "Stop advancing a rollout (devices deploying carry on)."),
                    ("resume", "Continue a paused rollout (the current soak starts over)."),
                    ("abort", "Stop a rollout and roll back every device it deployed to.")):
    rollout.add_command(_control(_name, _doc))


# ------------------------------------------------------------------------------ deploy --stages

_STAGED = ("stages", "max_failures", "soak", "stage_timeout", "db_url")


def _extend_deploy(deploy: click.Command) -> None:
    """Give ``deploy`` the staged-rollout options; with ``--stages`` it plans a rollout."""
    if any(p.name == "stages" for p in deploy.params):
        return
    deploy.params.extend([
        click.Option(["--stages"], default=None, help="Staged rollout to --group: cumulative "
                     "percentages per stage, e.g. 1,10,50,100 (driven by 'edgepack fleet "
                     "serve' on the --db database)."),
        *_stage_options("With --stages: "),
        click.Option(list(_DB_DECLS), **{**_DB_ATTRS, "help": "With --stages: "
                                         + _DB_ATTRS["help"]}),
        *_check_options(),
    ])
    original = deploy.callback

    def callback(**kw: Any) -> Any:
        staged = {k: kw.pop(k) for k in _STAGED}
        checks = {k: kw.pop(k) for k in _CHECKS}
        if staged["stages"] is None:
            return original(**kw)
        if kw.get("group") is None or kw.get("device") is not None:
            raise click.UsageError("--stages rolls out to a --group (not a --device)")
        if kw.get("wait_s") is not None:
            raise click.UsageError("--wait does not apply to --stages: watch with "
                                   "'edgepack rollout status ID --watch'")
        cfg = broker_config(kw["broker_url"], ca=kw["ca"], cert=kw["cert"],
                            cert_key=kw["cert_key"], username=kw["username"],
                            password=kw["password"])
        _start(staged["db_url"], cfg, kw["bundle_or_id"], group=kw["group"],
               fleet_name=kw["fleet_name"], stages=staged["stages"],
               max_failures=staged["max_failures"], soak=staged["soak"],
               stage_timeout=staged["stage_timeout"], key_path=kw["key_path"],
               allow_downgrade=kw["allow_downgrade"], devices=None, as_json=kw["as_json"],
               **checks)
        return None

    deploy.callback = callback


def register(main: click.Group) -> None:
    """Add ``fleet serve``, ``fleet simulate`` and ``rollout``; give ``deploy`` --stages."""
    fleet = main.commands.get("fleet")
    if not isinstance(fleet, click.Group):
        raise RuntimeError("register cli.fleet before cli.serve: no 'fleet' group yet")
    fleet.add_command(serve_cmd)
    fleet.add_command(simulate_cmd)
    main.add_command(rollout)
    deploy = main.commands.get("deploy")
    if deploy is not None:
        _extend_deploy(deploy)
