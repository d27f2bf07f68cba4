"""The TFLite Micro backend: the TFLite backend's model, plus C sources, arena plan and a run in
the TFLM interpreter on this host."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from edgepack.host.build import tflm
from edgepack.host.build.backends.tflite import TfliteBackend, _entries
from edgepack.host.build.convert_tflite import LiteRTSession
from edgepack.host.build.plan import BuildPlan
from edgepack.host.build.report import Progress

__all__ = ["TflmBackend"]


class TflmBackend(TfliteBackend):
    """Bundles for microcontrollers: ``model.tflite`` and ``tflm/`` sources, run by TFLM."""

    format = "tflm"

    def format_files(self, base: Any, best: Any, model_bytes: bytes, plan: BuildPlan,
                     progress: Progress) -> tuple[dict[str, bytes], dict]:
        files: dict[str, bytes] = {}
        with progress.stage("TFLM sources"):
            arena = tflm.plan_arena(model_bytes)
            budget_notes = tflm.check_budgets(model_bytes, arena, plan.profile)
            ins, outs = _entries(best.session, "inputs"), _entries(best.session, "outputs")
            for fname, data in tflm.write_sources(model_bytes, arena, inputs=ins, outputs=outs,
                                                  name=plan.name,
                                                  target=plan.profile.name).items():
                files[f"tflm/{fname}"] = data
            host_check = _host_check(model_bytes, best.session, [
                f for _, f in zip(range(16), base.data.evalset.batches(plan.data.batch),
                                  strict=False)])
        return files, {"tflm": {"arena": arena.to_dict(), "budgets": budget_notes,
                                "resolver": [{"op": o, "method": mth, "uses": c}
                                             for o, mth, c in tflm.resolver_ops(model_bytes)],
                                "host_check": host_check, "files": sorted(files)}}


def _host_check(model_bytes: bytes, sess: LiteRTSession, feeds: list[dict]) -> dict:
    """Run the model in the TFLM interpreter (reference kernels) when ``tflite-micro`` is here."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except Exception:
        return {"ran": False, "why": "tflite-micro (the TFLM Python interpreter) is not installed"}
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
        # print_allocations writes to the C-level stdout/stderr: capture both through a file.
        from edgepack.host.build.tflite_intake import captured_output

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
