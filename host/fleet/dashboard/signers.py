"""Which key signed each published bundle, as this server verified it.

A bundle's manifest message names the key of its chunk table signature (``table_sig.key_id``),
but anyone who can publish on the broker can write any key id there. The dashboard shows a
signer only when :class:`SignerCheck` verified the signature itself, against the fleet's trusted
public keys (``trusted_keys=``, the ``.pub`` files devices trust); otherwise the bundle is
``unverified`` (or ``unsigned``).

:class:`SignerCheck` keeps one MQTT connection subscribed to the retained
``bundles/+/manifest`` messages of the served fleets; its network thread only hands each
message to a worker thread, which verifies it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from edgepack.agent.errors import BrokerError, EdgepackError
from edgepack.agent.mqtt import BrokerConfig, MqttClient
from edgepack.agent.protocol import Topics, chunk_table_payload, decode
from edgepack.agent.signing import canonical_json, load_public_keys, verify_detached

__all__ = ["SignerCheck", "signer_of"]

log = logging.getLogger("edgepack.dashboard")


def signer_of(table: dict, keys: dict[str, Any]) -> tuple[str | None, str]:
    """``(key_id, status)`` of a manifest message: ``verified`` (key_id set), ``unverified``
    (signed by a key that is not trusted here, or the signature does not verify) or
    ``unsigned``."""
    sig = table.get("table_sig")
    if not isinstance(sig, dict):
        return None, "unsigned"
    try:
        signed = chunk_table_payload(table["bundle_id"], table["bytes"], table["chunk_size"],
                                     table["chunks"])
        return verify_detached(canonical_json(signed), sig, keys, what="chunk table"), \
            "verified"
    except (EdgepackError, KeyError, TypeError, ValueError):
        return None, "unverified"


class SignerCheck:
    """Verified signers of published bundles, per ``(fleet, bundle_id)``; ``start``/``close``."""

    def __init__(self, cfg: BrokerConfig, fleets: Sequence[str],
                 trusted_keys: Sequence[str], client_id: str) -> None:
        self.keys = load_public_keys(trusted_keys) if trusted_keys else {}
        self.fleets = [f for f in fleets if f not in ("+", "#")]
        self._results: dict[tuple[str, str], tuple[str | None, str]] = {}
        self._q: queue.Queue = queue.Queue(maxsize=10_000)
        self._client = MqttClient(cfg, client_id, handler=self._hand_over)
        self._filters = {f"{Topics(f).prefix}bundles/+/manifest": f for f in self.fleets}
        self._worker = threading.Thread(target=self._run, name="edgepack-signers", daemon=True)

    def status(self, fleet: str, bundle_id: str) -> tuple[str | None, str]:
        """``(key_id, status)``; ``unverified`` until a message was verified."""
        return self._results.get((fleet, bundle_id), (None, "unverified"))

    def start(self) -> SignerCheck:
        if not self.keys:
            return self  # nothing can be verified: every signer is "unverified"
        self._worker.start()
        try:
            self._client.connect()
        except BrokerError as exc:  # paho's loop retries the first connection by itself
            log.warning("signer check: %s", exc)
        self._client.loop_start()
        return self

    def close(self) -> None:
        if self._worker.is_alive():
            self._client.close()
            self._q.put(None)
            self._worker.join(5)

    # paho's thread: hand over only
    def _hand_over(self, event: tuple) -> None:
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(event)

    def _run(self) -> None:
        while (event := self._q.get()) is not None:
            if event[0] == "connected":
                with contextlib.suppress(BrokerError):
                    self._client.subscribe(list(self._filters))
            elif event[0] == "message":
                self._check(event[1], event[2])

    def _check(self, topic: str, payload: bytes) -> None:
        fleet = next((f for flt, f in self._filters.items()
                      if topic.startswith(flt.split("+")[0])), None)
        if fleet is None or not payload:
            return
        try:
            table = decode(payload, "bundle manifest message")
        except EdgepackError:
            return
        bid = table.get("bundle_id")
        if isinstance(bid, str) and topic.split("/")[-2] == bid:
            self._results[(fleet, bid)] = signer_of(table, self.keys)
