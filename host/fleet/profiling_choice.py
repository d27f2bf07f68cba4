"""Let devices choose the variant to ship (``build`` with ``profile_on=``).

Given candidate bundles and the fp32 reference outputs on eval samples,
:func:`choose_on_devices` applies the accuracy gate (:func:`edgepack.host.build.validate.compare`)
to the outputs the *device* computed, and picks the fastest passing candidate by p95 within the
RSS (and p95) budget; every candidate's report says why it lost. :func:`stamp_bundle` writes the
winner with the device figures in its manifest. The build engine's choose stage
(:mod:`edgepack.host.build.choose`) calls both with the candidates it already built.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import DataError, EdgepackError, GateError
from edgepack.agent.mqtt import BrokerConfig
from edgepack.agent.protocol import MAX_EVAL_BYTES
from edgepack.host.fleet.profiling import DeviceRun, ProfileCache, bundle_info, profile_on_devices

#: eval samples a signed job sends to devices: at least _MIN_FEEDS feeds, within this many bytes
EVAL_SEND_BYTES = 8 * 1024 * 1024
_MIN_FEEDS = 8

__all__ = ["Candidate", "CandidateReport", "DeviceChoice", "choose_on_devices", "stamp_bundle"]


@dataclass(frozen=True)
class Candidate:
    """A candidate variant, already packaged as a bundle (signed with the fleet key)."""

    label: str
    bundle: Path


@dataclass
class CandidateReport:
    """One candidate's device figures and verdict."""

    label: str
    bundle: str
    bundle_id: str
    passed: bool = False
    result: str = ""  # "chosen", or why it lost
    p95_ms: float | None = None  # worst over the devices
    p50_ms: float | None = None
    peak_rss_mb: float | None = None
    devices: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DeviceChoice:
    """What :func:`choose_on_devices` decided, and why."""

    winner: CandidateReport | None
    candidates: list[CandidateReport]
    devices: dict[str, dict]
    max_drop: float
    rss_budget_mb: float | None
    p95_budget_ms: float | None
    eval_samples: int
    messages: list[str] = field(default_factory=list)

    def require(self) -> CandidateReport:
        """The winner; GateError naming every candidate's reason when none passed."""
        if self.winner is not None:
            return self.winner
        lines = "; ".join(f"{c.label}: {c.result}" for c in self.candidates)
        extra = (" " + " ".join(self.messages)) if self.messages else ""
        raise GateError(f"no candidate passed on the devices ({lines}).{extra}", stage="gate")

    def manifest_entry(self) -> dict[str, Any]:
        """What the shipped bundle's manifest records: the winner's figures and who measured."""
        w = self.require()
        return {"chosen_by": "device profiling", "candidate": w.label,
                "p95_ms": w.p95_ms, "p50_ms": w.p50_ms, "peak_rss_mb": w.peak_rss_mb,
                "max_drop_points": self.max_drop,
                "devices": {d: {k: f.get(k) for k in (
                    "measured_by", "board", "runtime", "runtime_version", "threads", "load_ms",
                    "first_ms", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "drop_points",
                    "basis", "cached", "job_id")} for d, f in w.devices.items()},
                "candidates": {c.label: {"p95_ms": c.p95_ms, "result": c.result}
                               for c in self.candidates}}

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.label if self.winner else None,
                "candidates": [c.to_dict() for c in self.candidates], "devices": self.devices,
                "max_drop": self.max_drop, "rss_budget_mb": self.rss_budget_mb,
                "p95_budget_ms": self.p95_budget_ms, "eval_samples": self.eval_samples,
                "messages": list(self.messages)}


def _names(evalset: Any, input_specs: Sequence[Any] | None) -> list[str]:
    return list(evalset.inputs) if input_specs is None else [s.name for s in input_specs]


def _feed_bytes(evalset: Any, batch: int, input_specs: Sequence[Any] | None) -> int:
    """Bytes of one feed (one batch of every input) of the eval samples."""
    return sum(evalset.inputs[n][:batch].nbytes for n in _names(evalset, input_specs))


def _eval_payload(evalset: Any, batch: int, input_specs: Sequence[Any] | None,
                  limit: int) -> tuple[bytes, int]:
    """The eval samples as model-shaped feeds (``input_{i}``: (n, *input shape)), at most
    ``limit`` bytes: ``(npz bytes, n feeds)``."""
    names = _names(evalset, input_specs)
    n_total = len(evalset) // batch
    if n_total == 0:
        raise DataError(f"the eval set holds {len(evalset)} samples, fewer than one batch of "
                        f"{batch}")
    per_feed = _feed_bytes(evalset, batch, input_specs)
    n = min(n_total, max(0, (limit - 4096 - 512 * len(names)) // max(1, per_feed)))
    if n == 0:
        raise DataError(f"one eval sample is {per_feed} bytes: more than a profile job carries "
                        f"({limit} bytes). Profile without device-side gating (edgepack "
                        "profile), or use a smaller input.")
    arrays = {}
    for i, name in enumerate(names):
        arr = evalset.inputs[name][:n * batch]
        spec = input_specs[i] if input_specs is not None else None
        shape = tuple(spec.shape) if spec is not None else ()
        if shape and all(isinstance(x, int) and x > 0 for x in shape) \
                and int(np.prod(shape)) * n == arr.size:
            arrays[f"input_{i}"] = arr.reshape(n, *shape)
        else:
            arrays[f"input_{i}"] = arr.reshape(n, batch, *arr.shape[1:])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), n


def _device_outputs(result: Mapping[str, Any], n_outputs: int, batch: int,
                    out_meta: Sequence[Mapping[str, Any]]) -> tuple[list[Any], int]:
    """The outputs the device computed on the eval samples, shaped like the host's."""
    ev = result.get("eval") or {}
    blob = ev.get("outputs_npz")
    k = int(ev.get("samples") or 0)
    arrays: list[Any] = [None] * n_outputs
    if not blob or k == 0:
        return arrays, 0
    with np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False) as z:
        for j in range(n_outputs):
            key = f"output_{j}"
            if key not in z.files:
                continue
            a = z[key][:k]
            q = (out_meta[j].get("quantization") or {}) if j < len(out_meta) else {}
            if q.get("scale") and a.dtype.kind in "iu":
                a = (a.astype(np.float64) - float(q.get("zero_point") or 0)) * float(q["scale"])
                a = a.astype(np.float32)
            arrays[j] = a.reshape(k * batch, *a.shape[2:]) if a.ndim >= 2 else a
    return arrays, k


def choose_on_devices(candidates: Sequence[Candidate], *, devices: Sequence[str],
                      broker: str | BrokerConfig, key_path: str | os.PathLike | None,
                      output_specs: Sequence[Any], evalset: Any, reference: Any,
                      max_drop: float, batch: int = 1, input_specs: Sequence[Any] | None = None,
                      rss_budget_mb: float | None = None, p95_budget_ms: float | None = None,
                      fleet: str = "default", runs: int = 50, warmup: int = 5,
                      threads: int = 0, timeout: float = 600.0,
                      cache: ProfileCache | None = None,
                      on_message: Callable[[str, dict], None] | None = None,
                      device_keys: Mapping[str, Any] | None = None) -> DeviceChoice:
    """Profile candidate bundles on ``devices`` and pick the one to ship.

    ``reference`` (:class:`edgepack.host.build.validate.Outputs`) holds the fp32 model's outputs on
    ``evalset`` (:class:`edgepack.host.build.data.Dataset`, labels optional), ``output_specs`` /
    ``input_specs`` the model's tensors (``PreparedModel.outputs`` / ``.inputs``). The first
    samples that fit a job are sent to the devices; each device returns its outputs on them,
    which go through the same gate as on the host (``validate.compare`` against the fp32
    reference, ``max_drop`` points). A candidate wins when it passes the gate and its golden
    check on every device, fits ``rss_budget_mb`` (peak RSS) and ``p95_budget_ms``, and has the
    lowest p95 (worst over the devices). Returns every candidate's figures and verdict; call
    :meth:`DeviceChoice.require` for the winner (GateError when none passed).
    ``device_keys``: results of those devices count only when their enrolled key signed them
    (:func:`~edgepack.host.fleet.profiling.profile_on_devices`).
    """
    from edgepack.host.build.validate import Outputs, compare

    if not candidates:
        raise EdgepackError("no candidate bundles to profile")
    # A signed (v2) job names the samples as a target fetched in chunks; an unsigned (v1) one
    # carries them inline, within MAX_EVAL_BYTES.
    limit = MAX_EVAL_BYTES
    if key_path is not None:  # as many samples as before, but at least _MIN_FEEDS of any size
        need = _MIN_FEEDS * _feed_bytes(evalset, batch, input_specs) + 65536
        limit = max(MAX_EVAL_BYTES, min(EVAL_SEND_BYTES, need))
    eval_npz, n_feeds = _eval_payload(evalset, batch, input_specs, limit)
    rep = profile_on_devices([(c.label, str(c.bundle)) for c in candidates], devices,
                             broker=broker, key_path=key_path, fleet=fleet, runs=runs,
                             warmup=warmup, threads=threads, timeout=timeout, cache=cache,
                             eval_npz=eval_npz, on_message=on_message,
                             device_keys=device_keys)
    labels = evalset.labels
    reports: list[CandidateReport] = []
    for c in candidates:
        info = meta = bundle_info(c.bundle)
        cr = CandidateReport(label=c.label, bundle=str(c.bundle), bundle_id=info["bundle_id"])
        problems: list[str] = []
        p95s, p50s, rsss = [], [], []
        for d, run in rep.devices.items():
            res = run.results.get(info["bundle_id"])
            if res is None or res.get("status") != "ok":
                why = (f"{res.get('status')} ({res.get('reason')}): {res.get('detail')}" if res
                       else run.message or f"no result ({run.status})")
                problems.append(f"not measured on {d}: {why}")
                cr.devices[d] = {"status": res.get("status") if res else run.status,
                                 "detail": why, **_figures(res or {}, run)}
                continue
            outs, k = _device_outputs(res, len(output_specs), batch, meta["outputs"])
            rows = k * batch
            ref_k = Outputs([a[:rows] if a is not None else None for a in reference.arrays])
            gate = compare(output_specs, ref_k, Outputs(outs),
                           labels[:rows] if labels is not None else None) if k else None
            f = _figures(res, run)
            f.update(status="ok", eval_samples=rows,
                     drop_points=round(gate.drop_points, 4) if gate else None,
                     basis=gate.basis if gate else None,
                     top1_agreement=gate.top1_agreement if gate else None,
                     accuracy=gate.accuracy_optimized if gate else None,
                     min_cosine=gate.min_cosine if gate else None)
            cr.devices[d] = f
            if gate is None:
                problems.append(f"{d} returned no outputs on the eval samples")
            elif gate.drop_points > max_drop:
                problems.append(f"gate on {d}: drop {gate.drop_points:.2f} > {max_drop:g} pt "
                                f"({gate.basis})")
            if not (res.get("golden") or {}).get("passed"):
                fails = (res.get("golden") or {}).get("failures") or ["failed"]
                problems.append(f"golden check on {d}: {'; '.join(fails)[:200]} (it would fail "
                                "the install health gate)")
            p95, rss = f.get("p95_ms"), f.get("peak_rss_mb")
            if rss_budget_mb is not None and rss is not None and rss > rss_budget_mb:
                problems.append(f"peak RSS {rss:.1f} MB on {d} is over the {rss_budget_mb:g} MB "
                                "budget")
            if p95_budget_ms is not None and p95 is not None and p95 > p95_budget_ms:
                problems.append(f"p95 {p95:.3f} ms on {d} is over the {p95_budget_ms:g} ms "
                                "budget")
            p95s.append(p95)
            p50s.append(f.get("p50_ms"))
            rsss.append(rss)
        cr.p95_ms = max(p95s) if p95s and None not in p95s else None
        cr.p50_ms = max(p50s) if p50s and None not in p50s else None
        cr.peak_rss_mb = max(rsss) if rsss and None not in rsss else None
        cr.passed = not problems and cr.p95_ms is not None
        cr.result = "; ".join(problems) if problems else ""
        reports.append(cr)
    messages = [r.message for r in rep.devices.values()
                if r.status in ("timeout", "refused") and r.message]
    passing = [c for c in reports if c.passed]
    # A device that did not finish leaves the comparison open: the unmeasured candidates
    # might have been faster, so nothing is chosen (the partial figures stay in the report).
    winner = min(passing, key=lambda c: c.p95_ms) if passing and not messages else None
    for c in reports:
        if c is winner:
            c.result = "chosen"
        elif c.passed and winner is not None:
            c.result = (f"slower: p95 {c.p95_ms:.3f} ms vs {winner.p95_ms:.3f} ms "
                        f"({c.p95_ms / winner.p95_ms:.2f}x of the chosen)")
        elif c.passed:
            c.result = ("passed, not chosen: the comparison is incomplete (a device did not "
                        "finish)")
    return DeviceChoice(winner=winner, candidates=reports,
                        devices={d: r.to_dict() for d, r in rep.devices.items()},
                        max_drop=max_drop, rss_budget_mb=rss_budget_mb,
                        p95_budget_ms=p95_budget_ms, eval_samples=n_feeds * batch,
                        messages=messages)


def _figures(res: Mapping[str, Any], run: DeviceRun) -> dict[str, Any]:
    lat = res.get("latency_ms") or {}
    ops = res.get("ops") or {}
    return {"measured_by": res.get("measured_by"), "cached": bool(res.get("cached")),
            "job_id": res.get("cached_job_id") or run.job_id,
            "board": res.get("board") or run.board, "runtime": res.get("runtime"),
            "runtime_version": res.get("runtime_version"), "threads": res.get("threads"),
            "load_ms": res.get("load_ms"), "first_ms": res.get("first_ms"),
            "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
            "runs": lat.get("runs"), "peak_rss_mb": res.get("peak_rss_mb"),
            "golden_passed": (res.get("golden") or {}).get("passed"),
            "top_ops": [(o.get("op"), o.get("ms")) for o in (ops.get("ops") or [])[:3]]}


def stamp_bundle(src: str | os.PathLike, out: str | os.PathLike, entry: Mapping[str, Any], *,
                 key_path: str | os.PathLike | None,
                 report_extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``src`` again as ``out`` with ``manifest["device_profile"] = entry`` (and
    ``report_extra`` merged into ``report.json``), signed with ``key_path``."""
    from edgepack.host.build.package import write_bundle

    b = read_bundle(src)
    manifest = json.loads(b.manifest_bytes)
    manifest["device_profile"] = dict(entry)
    files = {name: b.read_member(name) for name in b.manifest["files"]}
    if report_extra and "report.json" in files:
        report = json.loads(files["report.json"])
        report.update(report_extra)
        files["report.json"] = json.dumps(report, indent=2, sort_keys=True,
                                          default=float).encode()
    from edgepack.host.keys import signer

    sign, _ = signer(key_path)
    return write_bundle(out, manifest, b.read_member(b.model_file), files, sign=sign)
