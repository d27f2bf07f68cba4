"""Device measurements kept on the host, per (board, runtime, runtime version, model, threads).

Devices with the same board and runtime are measured once, and a bundle already measured on
such a board is not measured again (no job is sent at all).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ProfileCache", "cache_key", "default_cache_path"]


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/edgepack/profiles.json`` (``~/.cache/edgepack/profiles.json``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack" / "profiles.json"


def cache_key(board: str, runtime: str, runtime_version: str, model_sha256: str,
              threads: int) -> str:
    """What makes two measurements interchangeable: same board, runtime build, model, threads."""
    return f"{board}|{runtime}|{runtime_version}|{model_sha256}|t{threads}"


class ProfileCache:
    """Device measurements on the host, one JSON file (``path=None``: in memory only).

    Only complete results are stored. Outputs on eval samples are stored per eval-set
    fingerprint, since the gate needs the outputs on *its* samples.
    """

    MAX_ENTRIES = 2000

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if isinstance(doc, dict) and doc.get("version") == 1:
                    self._entries = dict(doc.get("entries") or {})
            except (OSError, ValueError):
                self._entries = {}  # a corrupt cache is only a cache

    @classmethod
    def default(cls) -> ProfileCache:
        return cls(default_cache_path())

    def get(self, key: str, eval_fp: str | None = None) -> dict | None:
        """The stored result (``eval`` filled for ``eval_fp``), or None when it cannot serve."""
        e = self._entries.get(key)
        if e is None:
            return None
        result = dict(e["result"])
        if eval_fp is not None:
            ev = (e.get("eval") or {}).get(eval_fp)
            if ev is None:
                return None
            result["eval"] = ev
        result.update(cached=True, measured_by=e.get("device_id"),
                      measured_at=e.get("stored_at"), cached_job_id=e.get("job_id"))
        return result

    def put(self, key: str, result: Mapping[str, Any], *, device_id: str, job_id: str,
            eval_fp: str | None = None) -> None:
        if result.get("status") != "ok" or result.get("cached"):
            return
        body = {k: v for k, v in result.items() if k not in ("eval", "cached", "measured_by")}
        e = self._entries.get(key)
        if e is None or e["result"].get("model_sha256") != body.get("model_sha256"):
            e = {"eval": {}}
        e.update(result=body, device_id=device_id, job_id=job_id, stored_at=time.time())
        if eval_fp is not None and result.get("eval"):
            e.setdefault("eval", {})[eval_fp] = result["eval"]
        self._entries[key] = e
        if len(self._entries) > self.MAX_ENTRIES:
            oldest = sorted(self._entries, key=lambda k: self._entries[k].get("stored_at", 0))
            for k in oldest[:len(self._entries) - self.MAX_ENTRIES]:
                del self._entries[k]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": self._entries}, default=str))
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._entries)
