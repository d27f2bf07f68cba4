"""edgepack for Python programs: build, publish, deploy, roll out, profile and query a fleet.

::

    import edgepack.host as ep

    keys = ep.generate_keys("keys")                       # keys/fleet.key, keys/fleet.pub
    res = ep.build("model.onnx", target="rpi4", calibration="calib.npz", eval="eval.npz",
                   key="keys/fleet.key", out="dist")      # -> BuildResult
    ep.publish(res.path, broker="mqtt://localhost:1883", key="keys/fleet.key")
    ep.deploy(res.bundle_id, device="pi-kitchen", broker="mqtt://localhost:1883", wait=120)

The three wings behind it: ``edgepack.host.build`` (the engine: plan → import → pre-flight →
optimize → gate → choose → package), ``edgepack.host.fleet`` (publish/deploy, collector, storage,
rollouts, profiling jobs, simulator, dashboard, metrics, embedded broker) and
``edgepack.host.cli`` (the ``edgepack`` command, a thin layer over the same functions).

Nothing here prints or exits. Errors are :class:`EdgepackError` subclasses; ``err.context``
carries their fields (``field`` names the argument at fault). Names are imported on first use,
so ``import edgepack.host`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> "module:attribute" (or a module, for the callable build package)
_EXPORTS = {
    # build
    "build": "edgepack.host.build",
    "BuildResult": "edgepack.host.build.result:BuildResult",
    "BuildReport": "edgepack.host.build.result:BuildReport",
    # keys and bundles
    "generate_keys": "edgepack.host.keys:generate_keys",
    "read_bundle": "edgepack.agent.bundle:read_bundle",
    # fleet: broker, publish/deploy, queries, rollouts, profiling, server, devices
    "EmbeddedBroker": "edgepack.host.fleet.broker:EmbeddedBroker",
    "BrokerConfig": "edgepack.agent.mqtt:BrokerConfig",
    "publish": "edgepack.host.fleet.api:publish",
    "deploy": "edgepack.host.fleet.api:deploy",
    "fleet_status": "edgepack.host.fleet.api:fleet_status",
    "devices": "edgepack.host.fleet.api:devices",
    "device": "edgepack.host.fleet.api:device",
    "rollout_start": "edgepack.host.fleet.api:rollout_start",
    "rollout_status": "edgepack.host.fleet.api:rollout_status",
    "rollout_pause": "edgepack.host.fleet.api:rollout_pause",
    "rollout_resume": "edgepack.host.fleet.api:rollout_resume",
    "rollout_abort": "edgepack.host.fleet.api:rollout_abort",
    "rollouts": "edgepack.host.fleet.api:rollouts",
    "PublishResult": "edgepack.host.fleet.api:PublishResult",
    "DeployResult": "edgepack.host.fleet.api:DeployResult",
    "DeviceStatus": "edgepack.host.fleet.api:DeviceStatus",
    "DeviceRecord": "edgepack.host.fleet.api:DeviceRecord",
    "RolloutRecord": "edgepack.host.fleet.api:RolloutRecord",
    "RolloutStatus": "edgepack.host.fleet.api:RolloutStatus",
    "FleetServer": "edgepack.host.fleet.server:FleetServer",
    "ServeConfig": "edgepack.host.fleet.server:ServeConfig",
    "init_agent": "edgepack.host.fleet.provision:init_agent",
    "enroll": "edgepack.host.fleet.identity:enroll",
    "revoke": "edgepack.host.fleet.identity:revoke",
    "profile": "edgepack.host.fleet.profiling:profile",
    "ProfileReport": "edgepack.host.fleet.profiling:ProfileReport",
    # errors
    "EdgepackError": "edgepack.agent.errors:EdgepackError",
    "ProfileError": "edgepack.agent.errors:ProfileError",
    "BundleError": "edgepack.agent.errors:BundleError",
    "SignatureError": "edgepack.agent.errors:SignatureError",
    "ModelError": "edgepack.agent.errors:ModelError",
    "DataError": "edgepack.agent.errors:DataError",
    "GateError": "edgepack.agent.errors:GateError",
    "BudgetError": "edgepack.agent.errors:BudgetError",
    "ProtocolError": "edgepack.agent.errors:ProtocolError",
    "TransferError": "edgepack.agent.errors:TransferError",
    "InstallError": "edgepack.agent.errors:InstallError",
    "BrokerError": "edgepack.agent.errors:BrokerError",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'edgepack.host' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
