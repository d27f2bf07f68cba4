"""Flags that several commands share, defined once so every command spells them alike.

Every command that talks to a broker takes the same options: ``--broker mqtt[s]://host:port``
plus ``--ca/--cert/--cert-key`` for TLS client certificates and ``--username/--password``.
``--key`` is always the fleet *signing* key, never a TLS key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

__all__ = ["broker_options", "raw_broker_options", "broker_config", "fleet_option", "check_id"]


def check_id(what: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback checking a fleet, device or group id as the wire protocol does."""

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


def _broker_params(*, required: bool, key_flag: str) -> list[Callable]:
    """The broker flags every command shares; ``agent init`` and ``publish`` (and ``profile``)
    call the client key ``--client-key`` and need ``--broker``."""
    return [
        click.option("--broker", "broker_url", required=required,
                     default=None if required else "mqtt://127.0.0.1:1883",
                     show_default=not required, envvar="EDGEPACK_BROKER",
                     help="mqtt://host[:1883] or mqtts://host[:8883] (env EDGEPACK_BROKER)."),
        click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate that signed the broker's certificate (private CA)."),
        click.option("--cert", type=click.Path(exists=True, dir_okay=False),
                     help="TLS client certificate (mutual TLS)."),
        click.option(key_flag, "cert_key", type=click.Path(exists=True, dir_okay=False),
                     help="Private key of --cert."),
        click.option("--username", envvar="EDGEPACK_BROKER_USERNAME",
                     help="Broker username (env EDGEPACK_BROKER_USERNAME)."),
        click.option("--password", envvar="EDGEPACK_BROKER_PASSWORD",
                     help="Broker password (prefer env EDGEPACK_BROKER_PASSWORD)."),
    ]


def _apply(f: Callable, options: list[Callable]) -> Callable:
    for opt in reversed(options):
        f = opt(f)
    return f


def broker_options(f: Callable) -> Callable:
    """Add ``--broker``, TLS and credential options; the command gets ``broker_cfg``."""
    def wrapper(*args: Any, broker_url: str, ca: str | None, cert: str | None,
                cert_key: str | None, username: str | None, password: str | None,
                **kwargs: Any) -> Any:
        kwargs["broker_cfg"] = broker_config(broker_url, ca=ca, cert=cert, cert_key=cert_key,
                                             username=username, password=password)
        return f(*args, **kwargs)

    return _apply(functools.update_wrapper(wrapper, f),
                  _broker_params(required=False, key_flag="--cert-key"))


def raw_broker_options(f: Callable) -> Callable:
    """The same flags with ``--broker`` required and the key as ``--client-key``; the command
    gets the values as given (``broker``, ``ca``, ``cert``, ``client_key``, ``username``,
    ``password``), e.g. to write them into a device's config."""
    def wrapper(*args: Any, broker_url: str, cert_key: str | None, **kwargs: Any) -> Any:
        return f(*args, broker=broker_url, client_key=cert_key, **kwargs)

    return _apply(functools.update_wrapper(wrapper, f),
                  _broker_params(required=True, key_flag="--client-key"))


def broker_config(url: str, *, ca: str | None = None, cert: str | None = None,
                  cert_key: str | None = None, username: str | None = None,
                  password: str | None = None) -> Any:
    """A :class:`~edgepack.agent.mqtt.BrokerConfig` from the options of :func:`broker_options`."""
    from edgepack.agent.mqtt import parse_broker_url

    if cert_key and not cert:
        raise click.UsageError("a client key needs --cert (the certificate it belongs to)")
    return parse_broker_url(url, ca=ca, cert=cert, key=cert_key,
                            username=username, password=password)


fleet_option = click.option(
    "--fleet", "fleet_name", default="default", show_default=True, envvar="EDGEPACK_FLEET",
    callback=check_id("fleet name"), help="Fleet name: the topic prefix edgepack/v1/FLEET/.")


