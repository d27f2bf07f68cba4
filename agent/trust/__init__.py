"""Trust on the device (protocol v2): the trusted root, signed control messages, rollback
floors and freshness. python-tuf's Metadata API does the parsing, canonical JSON and
threshold signature checks; these modules add what a device-control message needs on top
(see ``control.py`` and docs/security.md).
"""

from edgepack.agent.trust.control import (
    KINDS,
    MAX_CONTROL_BYTES,
    ROLE_NAMES,
    SIGNERS,
    ControlMessage,
    Target,
    parse_control,
    target_path,
)
from edgepack.agent.trust.errors import (
    ControlRefused,
    FloorError,
    KeyFileError,
    Reason,
    ReportRefused,
    RootRefused,
    TrustError,
)
from edgepack.agent.trust.gate import DesiredGate, derive_root
from edgepack.agent.trust.ledger import Ledger
from edgepack.agent.trust.root import RootUpdate, TrustedRoot
from edgepack.agent.trust.verifier import (
    DEFAULT_SKEW_S,
    ControlVerifier,
    FloorDecision,
    FreshnessStatus,
    Verified,
)

__all__ = [
    "KINDS",
    "MAX_CONTROL_BYTES",
    "ROLE_NAMES",
    "SIGNERS",
    "DEFAULT_SKEW_S",
    "ControlMessage",
    "ControlRefused",
    "ControlVerifier",
    "DesiredGate",
    "FloorDecision",
    "FloorError",
    "FreshnessStatus",
    "KeyFileError",
    "Ledger",
    "Reason",
    "ReportRefused",
    "RootRefused",
    "RootUpdate",
    "Target",
    "TrustError",
    "TrustedRoot",
    "Verified",
    "derive_root",
    "parse_control",
    "target_path",
]
