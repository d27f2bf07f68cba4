"""Flags that several commands share: one definition each, so every command spells them alike.

``broker_options`` gives a command ``--broker``, ``--ca``, ``--cert``, ``--cert-key``, ``--username``
and ``--password`` and hands it one ``broker`` argument: a
:class:`~edgepack.agent.mqtt.BrokerConfig`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

__all__ = ["broker_options", "broker_config", "check_id", "fleet_option", "json_option"]


def broker_config(url: str, *, ca: str | None = None, cert: str | None = None,
                  cert_key: str | None = None, username: str | None = None,
                  password: str | None = None) -> Any:
    """A :class:`~edgepack.agent.mqtt.BrokerConfig` from the values of :func:`broker_options`."""
    from edgepack.agent.mqtt import parse_broker_url

    if cert_key and not cert:
        raise click.UsageError("--cert-key needs --cert")
    return parse_broker_url(url, ca=ca, cert=cert, key=cert_key,
                            username=username, password=password)


def broker_options(*, required: bool = False) -> Callable[[Callable], Callable]:
    """Add the broker and TLS flags; the command receives ``broker`` (a BrokerConfig)."""

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, broker: str, ca: str | None, cert: str | None,
                    cert_key: str | None, username: str | None, password: str | None,
                    **kwargs: Any) -> Any:
            cfg = broker_config(broker, ca=ca, cert=cert, cert_key=cert_key,
                                username=username, password=password)
            return f(*args, broker=cfg, **kwargs)

        options = [
            click.option("--broker", required=required, envvar="EDGEPACK_BROKER",
                         default=None if required else "mqtt://127.0.0.1:1883",
                         show_default=not required,
                         help="mqtt://host[:1883] or mqtts://host[:8883] (env EDGEPACK_BROKER)."),
            click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                         help="CA certificate that signed the broker's certificate."),
            click.option("--cert", type=click.Path(exists=True, dir_okay=False),
                         help="TLS client certificate (mutual TLS)."),
            click.option("--cert-key", "--client-key", "cert_key",
                         type=click.Path(exists=True, dir_okay=False),
                         help="Private key of --cert."),
            click.option("--username", envvar="EDGEPACK_BROKER_USERNAME",
                         help="Broker username (env EDGEPACK_BROKER_USERNAME)."),
            click.option("--password", envvar="EDGEPACK_BROKER_PASSWORD",
                         help="Broker password (prefer env EDGEPACK_BROKER_PASSWORD)."),
        ]
        for opt in reversed(options):
            wrapper = opt(wrapper)
        return wrapper

    return decorate


def check_id(what: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that checks a fleet/device/group id as the wire protocol does."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from edgepack.agent.errors import ProtocolError
        from edgepack.agent.protocol import check_id as protocol_check_id

        if value is None:
            return None
        try:
            return protocol_check_id(value, what)
        except ProtocolError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


fleet_option = click.option(
    "--fleet", "fleet_name", default="default", show_default=True, envvar="EDGEPACK_FLEET",
    callback=check_id("fleet name"), help="Fleet name: the topic prefix edgepack/v1/FLEET/.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
