"""The TFLite Micro backend: the TFLite backend's model, plus C sources, and a run in the TFLM
interpreter on this host that validates the model and measures its tensor arena.

A ``.tflite`` given as it is runs in TFLite Micro from the start (its reference and golden
outputs are TFLM's): a model TFLM runs is never refused because LiteRT refuses it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build import tflm
from edgepack.host.build.backends.tflite import TfliteBackend, _entries
from edgepack.host.build.convert_tflite import LiteRTSession
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress
from edgepack.host.build.tflite_intake import (
    TfliteInfo,
    TflmCheck,
    TflmSession,
    captured_output,
    check_with_tflm,
    tflm_available,
    zero_inputs,
)

__all__ = ["TflmBackend"]

_SESSION_SLACK = 2  # the reference session's arena: the measured one times this (rows differ)


def _refused(name: str, check: TflmCheck, target: str) -> ModelError:
    return ModelError(f"{name}: {check.reason}. {target} runs TFLite Micro, so the model must use "
                      "ops and dtypes TFLM has kernels for (int8 or float32; not dynamic-range or "
                      "float16 weights): convert it again from the float source with full int8 "
                      "quantization, or pick a target that runs LiteRT (rpi4, android-arm64).",
                      target=target, stage="validate")


class TflmBackend(TfliteBackend):
    """Bundles for microcontrollers: ``model.tflite`` and ``tflm/`` sources, run by TFLM."""

    format = "tflm"

    def reference_session(self, model_bytes: bytes, plan: BuildPlan,
                          info: TfliteInfo | None) -> Any:
        """A given .tflite runs in TFLite Micro (what the device runs); a model converted here
        in LiteRT (its float reference has no int8 kernels to check yet)."""
        if info is None or not tflm_available():
            return super().reference_session(model_bytes, plan, info)
        check = check_with_tflm(model_bytes, zero_inputs(info))
        if not check.ok:
            raise _refused(plan.model.name, check, plan.profile.name)
        return TflmSession(model_bytes, check.arena_bytes * _SESSION_SLACK, name=plan.model.name)

    def format_files(self, base: Any, best: Any, model_bytes: bytes, plan: BuildPlan,
                     progress: Progress) -> tuple[dict[str, bytes], dict]:
        files: dict[str, bytes] = {}
        feeds = [f for _, f in zip(range(16), base.data.evalset.batches(plan.data.batch),
                                   strict=False)]
        with progress.stage("TFLite Micro check"):
            arena, measured = _arena(model_bytes, best.session, feeds, plan)
        with progress.stage("TFLM sources"):
            budget_notes = tflm.check_budgets(model_bytes, arena, plan.profile)
            ins, outs = _entries(best.session, "inputs"), _entries(best.session, "outputs")
            for fname, data in tflm.write_sources(model_bytes, arena, inputs=ins, outputs=outs,
                                                  name=plan.name,
                                                  target=plan.profile.name).items():
                files[f"tflm/{fname}"] = data
            host_check = _host_check(model_bytes, _litert(model_bytes, best.session), feeds)
        return files, {"tflm": {"arena": arena.to_dict(), "arena_kb": arena.recommended_bytes
                                // 1024, "measured_arena": measured, "budgets": budget_notes,
                                "resolver": [{"op": o, "method": mth, "uses": c}
                                             for o, mth, c in tflm.resolver_ops(model_bytes)],
                                "host_check": host_check, "files": sorted(files)}}


def _arena(model_bytes: bytes, sess: Any, feeds: list[dict], plan: BuildPlan
           ) -> tuple[tflm.ArenaPlan, dict]:
    """The arena plan with ``kTensorArenaSize`` from TFLM's own allocation (bisected to 16 bytes
    on this host) plus :data:`tflm.ARENA_MARGIN`, rounded up to 1 KiB (never below the planner's
    estimate); the planner's estimate alone when tflite-micro is not installed."""
    estimate = tflm.plan_arena(model_bytes)
    if not tflm_available():
        return estimate, {"measured": False, "why": "tflite-micro is not installed: "
                          "kTensorArenaSize is the planner's estimate"}
    check = check_with_tflm(model_bytes, sess.quantize_inputs(feeds[0]))
    if not check.ok:
        raise _refused(plan.model.name, check, plan.profile.name)
    # Never below the planner's estimate: it counts the scratch buffers CMSIS-NN / ESP-NN
    # kernels request, which TFLM's reference kernels on this host do not.
    kib = math.ceil(max(check.arena_bytes * tflm.ARENA_MARGIN, estimate.arena_bytes) / 1024)
    return replace(estimate, recommended_bytes=kib * 1024), {
        "measured": True, "tflm_arena_bytes": check.arena_bytes, "arena_kb": kib,
        "margin": tflm.ARENA_MARGIN, "estimate_bytes": estimate.arena_bytes,
        "note": "the smallest arena TFLite Micro allocates and invokes in on this 64-bit host "
                "(16-byte bisection), plus the margin, never below the planner's estimate (which "
                "counts vendor kernels' scratch); a 32-bit MCU needs a little less"}


def _litert(model_bytes: bytes, sess: Any) -> LiteRTSession | None:
    if isinstance(sess, LiteRTSession):
        return sess
    try:
        return LiteRTSession(model_bytes)
    except ModelError:
        return None  # LiteRT refuses it; TFLM runs it (checked above)


def _host_check(model_bytes: bytes, sess: LiteRTSession | None, feeds: list[dict]) -> dict:
    """Run the model in the TFLM interpreter (reference kernels) and compare with LiteRT."""
    if not tflm_available():
        return {"ran": False, "why": "tflite-micro (the TFLM Python interpreter) is not installed"}
    from tflite_micro.python.tflite_micro import runtime

    if sess is None:
        return {"ran": False, "why": "LiteRT refuses this model (TFLite Micro runs it): nothing "
                                     "to compare TFLM's outputs with"}
    try:
        it = runtime.Interpreter.from_bytes(model_bytes, arena_size=4 * 1024 * 1024)
        agree, total = 0, 0
        max_diff = 0
        for feed in feeds:
            raw = sess.quantize_inputs(feed)
            for i, name in enumerate(sess.input_names):
                it.set_input(raw[name], i)
            it.invoke()
            ref = sess.run_raw(raw)
            for j, r in enumerate(ref):
                y = it.get_output(j)
                max_diff = max(max_diff, int(np.abs(y.astype(np.int64) - r.astype(np.int64)).max()))
                if r.ndim == 2 and r.shape[1] > 1:
                    agree += int((y.argmax(1) == r.argmax(1)).sum())
                    total += len(r)
        with captured_output() as lines:
            it.print_allocations()
        text = "\n".join(lines)
        m = re.search(r"Arena allocation total (\d+) bytes", text)
        h = re.search(r"Arena allocation head (\d+) bytes", text)
        return {"ran": True, "samples": len(feeds), "max_abs_diff_vs_litert_q": max_diff,
                "top1_agreement_vs_litert": agree / total if total else None,
                "host_arena_total_bytes": int(m.group(1)) if m else None,
                "host_arena_head_bytes": int(h.group(1)) if h else None,
                "note": "TFLM reference kernels on this 64-bit host: the head (activations) "
                        "matches a 32-bit MCU, the tail (structs) is larger here"}
    except Exception as exc:
        return {"ran": False, "why": f"TFLM interpreter failed: {str(exc)[:300]}"}
