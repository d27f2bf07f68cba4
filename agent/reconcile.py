"""Reconcile: from the retained desired states a device follows to what it should do now.

Pure logic shared by the agent and the fleet simulator: the device's own desired state wins;
otherwise the newest of its groups' (equal timestamps: the group listed first in the device's
configuration). :func:`decide` compares the winner with what the device runs and works on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from edgepack.agent.protocol import DesiredState

__all__ = ["effective_desired", "Action", "Decision", "decide"]


def effective_desired(device: DesiredState | None, groups: Mapping[str, DesiredState],
                      group_order: Sequence[str]) -> DesiredState | None:
    """The desired state that applies: the device's own, else the newest of its groups'."""
    if device is not None:
        return device
    if not groups:
        return None
    order = {g: i for i, g in enumerate(group_order)}
    return max(groups.items(), key=lambda kv: (kv[1].ts, -order.get(kv[0], 0)))[1]


class Action(str, Enum):
    NOTHING = "nothing"  # nothing wanted, or the wanted bundle is active and reported
    CARRY_ON = "carry_on"  # the deployment in progress installs the wanted bundle already
    REPORT = "report"  # the wanted bundle is active: report the deployment as installed
    SKIP = "skip"  # this deployment of this bundle failed before: wait for a new one
    INSTALL = "install"  # start a deployment


@dataclass(frozen=True)
class Decision:
    action: Action
    desired: DesiredState | None = None
    #: why the deployment in progress must stop first (None: keep it, or there is none)
    cancel: str | None = None


def decide(want: DesiredState | None, *, working: DesiredState | None,
           active_bundle: str | None, reported: Callable[[str], bool],
           failed: Callable[[str, str], bool]) -> Decision:
    """What to do about ``want`` while working on ``working`` with ``active_bundle`` active.

    ``reported(deployment_id)``: that deployment's outcome was reported already;
    ``failed(deployment_id, bundle_id)``: it failed on this device before.
    """
    if want is None:
        return Decision(Action.NOTHING, None, "the desired state was cleared"
                        if working is not None else None)
    if working is not None and working.bundle_id == want.bundle_id:
        return Decision(Action.CARRY_ON, want)  # same bundle, maybe a new deployment id
    cancel = f"superseded by deployment {want.deployment_id}" if working is not None else None
    if active_bundle == want.bundle_id:
        action = Action.NOTHING if reported(want.deployment_id) else Action.REPORT
        return Decision(action, want, cancel)
    if failed(want.deployment_id, want.bundle_id):
        return Decision(Action.SKIP, want, cancel)
    return Decision(Action.INSTALL, want, cancel)
