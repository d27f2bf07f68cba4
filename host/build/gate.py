"""The gate stage both formats share: budgets, the accuracy gate's verdict, host warnings.

A backend measures its candidates (``validate.compare`` against the fp32 reference, latency on
this host) and hands the chosen one over as :class:`Measured`; everything said about it from
there on — over budget, over the allowed drop, slower than fp32, not the target's figures — is
said here, once for ONNX and TFLite.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.agent.errors import BudgetError, GateError
from edgepack.agent.profiles import Profile
from edgepack.host.build.validate import MIN_TOP1_SAMPLES, GateMetrics

__all__ = ["Measured", "check_budget", "check_drop", "check_fp32_budget", "host_cpu",
           "host_warnings"]

# How much smaller each mode makes a float32 model, for the early budget check.
_SHRINK = {"int8": 4.0, "dynamic": 4.0, "fp16": 2.0}


def host_cpu() -> str:
    """The host CPU's model name (``platform.processor()`` is empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Measured:
    """The chosen model as the gate saw it, next to the fp32 reference."""

    fp32_bytes: int
    optimized_bytes: int
    metrics: GateMetrics
    source: str  # where the eval samples came from
    fp32_latency: dict[str, Any]
    latency: dict[str, Any]
    threads: int
    runtime: str | None = None  # named in the latency entries when not onnxruntime

    @property
    def speedup(self) -> float:
        return self.fp32_latency["p50_ms"] / self.latency["p50_ms"]

    def manifest_metrics(self, profile: Profile) -> dict[str, Any]:
        m = self.metrics
        return {
            "fp32_bytes": self.fp32_bytes, "optimized_bytes": self.optimized_bytes,
            "size_ratio": self.fp32_bytes / self.optimized_bytes,
            "top1_agreement": m.top1_agreement, "accuracy_fp32": m.accuracy_fp32,
            "accuracy_optimized": m.accuracy_optimized, "drop_points": m.drop_points,
            "min_cosine": m.min_cosine, "max_abs_error": m.max_abs_error,
            "min_sqnr_db": m.min_sqnr_db, "gate_basis": m.basis,
            "eval_samples": m.samples, "eval_source": self.source,
            "host_latency_ms": {"fp32": self.fp32_latency, "optimized": self.latency,
                                "cpu": host_cpu(), **self._runtime(),
                                "representative": profile.host_can_time,
                                "threads": self.threads},
        }

    def report_metrics(self, profile: Profile) -> dict[str, Any]:
        return {"size": {"fp32_bytes": self.fp32_bytes, "optimized_bytes": self.optimized_bytes,
                         "ratio": self.fp32_bytes / self.optimized_bytes},
                "accuracy": {**self.metrics.to_dict(), "source": self.source},
                "latency": {"fp32": self.fp32_latency, "optimized": self.latency,
                            "speedup_p50": self.speedup, **self._runtime(),
                            "representative": profile.host_can_time, "threads": self.threads}}

    def _runtime(self) -> dict[str, str]:
        return {"runtime": self.runtime} if self.runtime else {}


def check_fp32_budget(fp32_bytes: int, mode: str, profile: Profile, *, what: str = "in fp32",
                      digits: int = 1) -> None:
    """Fail early when even the smallest the mode makes of the model cannot fit the budget."""
    shrink = _SHRINK.get(mode, 1.0)
    if fp32_bytes / shrink > profile.budgets.model_mb * 1024 * 1024:
        raise BudgetError(f"the model is {fp32_bytes / 2**20:.{digits}f} MB {what}; even {mode} "
                          f"(~{shrink:g}x smaller) cannot fit {profile.name}'s "
                          f"{profile.budgets.model_mb:g} MB model budget. Use a smaller model "
                          "(edgepack distill) or a bigger target.", target=profile.name)


def check_budget(model_bytes: int, profile: Profile, *, digits: int = 1) -> None:
    if model_bytes > profile.budgets.model_mb * 1024 * 1024:
        raise BudgetError(f"the optimized model is {model_bytes / 2**20:.{digits}f} MB, over "
                          f"{profile.name}'s {profile.budgets.model_mb:g} MB model budget",
                          target=profile.name)


def check_drop(metrics: GateMetrics, max_drop: float, what: str,
               target: str | None = None) -> None:
    """GateError when ``what`` lost more than ``max_drop`` points against fp32."""
    if metrics.drop_points > max_drop:
        raise GateError(f"{what} loses {metrics.drop_points:.2f} points ({metrics.basis}), over "
                        f"the allowed {max_drop:g}. Try another `quantize=` mode or raise "
                        "`max_drop=`.", target=target, stage="gate", field="max_drop")


def host_warnings(measured: Measured, profile: Profile, *, mode: str, label: str,
                  where: str = "", forced: bool = False) -> list[str]:
    """What the user must know about figures measured on this host (``where``: " in LiteRT";
    ``forced``: the user forced this mode although it measured slower than fp32)."""
    out = []
    speedup = measured.speedup
    if mode != "none" and speedup < 1.0 and profile.host_can_time:
        detail = "" if where else (f", p50 {measured.latency['p50_ms']:.3f} ms vs "
                                   f"{measured.fp32_latency['p50_ms']:.3f} ms")
        advice = ("shipped because `quantize=` forced it; leave `quantize=` at auto to ship "
                  "the fastest variant that passes the gate" if forced else
                  "consider no quantization or fp16")
        out.append(f"the {label} model is SLOWER than fp32{where} on this host "
                   f"({speedup:.2f}x of fp32 speed{detail}); {advice}")
    if not profile.host_can_time:
        out.append(f"latency was measured{where} on this host ({platform.machine()}), not on "
                   f"{profile.hardware.cpu}: use it to compare variants, not as the target's "
                   "figure")
    m = measured.metrics
    if m.small_eval and mode != "none":
        out.append(f"only {m.samples} eval samples ({measured.source}): too few to decide by "
                   f"top-1, so the gate compared outputs by cosine ({m.min_cosine:.5f}) and SQNR "
                   f"({m.min_sqnr_db:.1f} dB) with fp32; pass `eval=` with at least "
                   f"{MIN_TOP1_SAMPLES} samples (and a `labels` array to gate by accuracy)")
    if measured.source.startswith("16 random"):
        out.append("no eval or calibration data: the gate compared outputs on random inputs")
    elif "synthesized from" in measured.source:
        out.append(f"no eval data: golden samples are {measured.source.split(' (')[0]}; pass "
                   "`eval=` (an .npz keyed by field name, or a CSV with a header) to check the "
                   "model on real rows")
    return out
