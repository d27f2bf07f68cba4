"""The one error hierarchy of edgepack, shared by host and agent.

::

    EdgepackError                 root: the CLI prints ``error: …`` and exits 1
    ├── ProfileError              a device profile is unknown or malformed
    ├── BundleError               a bundle is corrupt, foreign, tampered or unsupported
    │   └── SignatureError        signature missing, wrong key, or does not verify
    ├── ModelError                the input model cannot be read, converted or run
    ├── DataError                 calibration / eval / sample data does not fit the model
    ├── GateError                 the optimized model failed the accuracy gate
    ├── BudgetError               the model does not fit the target's budgets
    ├── ProtocolError             a malformed or unexpected message on the wire
    ├── TransferError             a bundle could not be fetched from the broker
    ├── InstallError              a bundle could not be installed on the device
    └── BrokerError               the broker refused or dropped us (paho return codes)

Every error carries the context a user needs (``target``, ``stage``, ``bundle_id``, ``topic``)
and a message that says what happened and what to do.
"""

from __future__ import annotations

__all__ = [
    "EdgepackError",
    "ProfileError",
    "BundleError",
    "SignatureError",
    "ModelError",
    "DataError",
    "GateError",
    "BudgetError",
    "ProtocolError",
    "TransferError",
    "InstallError",
    "BrokerError",
]


class EdgepackError(Exception):
    """Root of every error edgepack raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message, **{
            k: str(v) for k, v in self.context.items()}}


class ProfileError(EdgepackError):
    """A device profile is unknown or malformed."""


class BundleError(EdgepackError):
    """A bundle is corrupt, truncated, foreign, tampered or of an unsupported schema."""


class SignatureError(BundleError):
    """The bundle (or chunk table) signature is missing, from an unknown key, or wrong."""


class ModelError(EdgepackError):
    """The input model cannot be read, converted, optimized or run."""


class DataError(EdgepackError):
    """Calibration, eval or sample data does not match the model's inputs."""


class GateError(EdgepackError):
    """The optimized model lost more accuracy than the gate allows."""


class BudgetError(EdgepackError):
    """The model does not fit the target's size, memory or latency budgets."""


class ProtocolError(EdgepackError):
    """A malformed, oversized or unexpected message arrived on the wire."""


class TransferError(EdgepackError):
    """A bundle could not be fetched (timeout, bad chunk, no space)."""


class InstallError(EdgepackError):
    """A bundle could not be installed or did not pass the health gate."""


class BrokerError(EdgepackError):
    """The MQTT broker refused the connection or an operation failed."""
