"""The accuracy gate: run the float and optimized models on the same samples and compare.

Also measures host latency of both in the same run, and — when int8 breaks the gate — ranks the
nodes that hurt most (per-node signal-to-quantization-noise loss from onnxruntime's
``qdq_loss_debug``) so the pipeline can keep them in float.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build.data import Dataset, TensorSpec

__all__ = ["MIN_TOP1_SAMPLES", "Outputs", "GateMetrics", "Session", "run_outputs", "compare", "measure_latency",
           "measure_interleaved", "rank_sensitive_nodes", "fidelity_points"]


# Below this many eval samples one flipped prediction moves top-1 agreement by over 3 points: a
# classifier is then gated by cosine and SQNR against fp32, which every sample informs.
MIN_TOP1_SAMPLES = 30


class Session:
    """An onnxruntime session with fixed threads, for eval and timing on the host."""

    def __init__(self, model_bytes: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {str(exc)[:300]}") from None
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[Any]:
        return self.sess.run(None, feed)


@dataclass
class Outputs:
    """Outputs per model output, stacked over samples; None where the output is not a tensor."""

    arrays: list[np.ndarray | None]


def run_outputs(session: Session, data: Dataset, batch: int = 1) -> Outputs:
    per: list[list[Any]] = [[] for _ in session.output_names]
    for feed in data.batches(batch):
        for i, out in enumerate(session.run(feed)):
            per[i].append(out)
    arrays: list[np.ndarray | None] = []
    for outs in per:
        if outs and isinstance(outs[0], np.ndarray):
            arr = np.concatenate([o.reshape(batch, *o.shape[1:]) if o.ndim else o.reshape(1)
                                  for o in outs])
            # string tensors come back as object arrays; numpy str arrays save without pickle
            arrays.append(arr.astype(str) if arr.dtype.kind == "O" else arr)
        else:
            arrays.append(None)
    return Outputs(arrays)


@dataclass
class GateMetrics:
    """What the report shows about accuracy; ``drop_points`` is what the gate checks."""

    samples: int
    compared: list[str] = field(default_factory=list)
    not_compared: dict[str, str] = field(default_factory=dict)
    top1_agreement: float | None = None
    accuracy_fp32: float | None = None
    accuracy_optimized: float | None = None
    min_cosine: float | None = None
    max_abs_error: float | None = None
    drop_points: float = 0.0
    basis: str = ""
    max_rel_error: float | None = None  # regression: max |error| over the output's largest |value|
    min_sqnr_db: float | None = None  # signal-to-quantization-noise of the worst float output
    small_eval: bool = False  # under MIN_TOP1_SAMPLES samples: gated by cosine/SQNR, not top-1

    def to_dict(self) -> dict:
        return asdict(self)


def _labels(arr: np.ndarray) -> np.ndarray | None:
    """Per-sample labels from a label output (strings, or integers one per sample)."""
    if arr.dtype.kind in "USO" or (arr.dtype.kind in "iu" and arr.ndim == 1):
        return arr.reshape(len(arr))
    return None


def _class_scores(arr: np.ndarray) -> np.ndarray | None:
    """Per-sample predicted class from a score/logit output, or labels from a label output."""
    labels = _labels(arr)
    if labels is not None:
        return labels
    if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] > 1:
        return np.nan_to_num(arr, nan=-np.inf).argmax(axis=1)
    return None


def _sqnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Signal-to-noise of ``b`` against the reference ``a`` in dB (200 when identical)."""
    fa, fb = np.nan_to_num(a.astype(np.float64)), np.nan_to_num(b.astype(np.float64))
    noise = float(np.square(fa - fb).sum())
    signal = float(np.square(fa).sum())
    if noise == 0.0:
        return 200.0
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


def fidelity_points(min_cosine: float, min_sqnr_db: float) -> float:
    """Cosine loss or relative noise energy (10^(-SQNR/10)), the larger, in points of 0-100:
    1 point is a cosine of 0.99 or an SQNR of 20 dB."""
    return 100.0 * max(0.0, 1.0 - min_cosine, min(1.0, 10.0 ** (-min_sqnr_db / 10.0)))


def _float_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(min cosine, max |error|, max relative error) of two float outputs; NaN (a missing
    prediction) agrees only with NaN. Rows of one value are compared as one column."""
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    nan_a, nan_b = np.isnan(fa), np.isnan(fb)
    if (nan_a != nan_b).any():
        return 0.0, float("inf"), float("inf")
    fa, fb = np.where(nan_a, 0.0, fa), np.where(nan_b, 0.0, fb)
    if fa.shape[1] == 1:
        fa, fb = fa.T, fb.T
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (fa * fb).sum(1) / np.maximum(na * nb, 1e-30))
    err = float(np.abs(fa - fb).max()) if fa.size else 0.0
    scale = float(np.abs(fa).max()) if fa.size else 0.0
    return float(cos.min()), err, err / scale if scale > 0 else (0.0 if err == 0 else 1.0)


def compare(specs: Sequence[TensorSpec], ref: Outputs, opt: Outputs,
            labels: np.ndarray | None) -> GateMetrics:
    """Compare what can be compared; say what could not.

    A model with a label or class-score output is a classifier, gated by top-1 (label)
    agreement or by accuracy against ``labels``; otherwise by relative error and cosine
    against fp32 (a regression is never gated by top-1). A classifier with fewer than
    :data:`MIN_TOP1_SAMPLES` eval samples is gated by cosine and SQNR of its float outputs
    (:func:`fidelity_points`); top-1 and accuracy are still reported.
    """
    n = next((len(a) for a in ref.arrays if a is not None), 0)
    m = GateMetrics(samples=n)
    cosines, errors, rel, sqnrs = [], [], [], []
    preds_ref = preds_opt = None
    for spec, a, b in zip(specs, ref.arrays, opt.arrays, strict=True):
        if a is None or b is None:
            m.not_compared[spec.name] = f"{spec.dtype} output (not a tensor): not compared"
            continue
        m.compared.append(spec.name)
        if a.dtype.kind == "f":
            cos, err, rerr = _float_diff(a, b)
            cosines.append(cos)
            errors.append(err)
            rel.append(rerr)
            sqnrs.append(_sqnr_db(a, b))
        if preds_ref is None:
            pr, po = _class_scores(a), _class_scores(b)
            if pr is not None and po is not None:
                preds_ref, preds_opt = pr, po
    if cosines:
        m.min_cosine = min(cosines)
        m.max_abs_error = max(errors)
        m.min_sqnr_db = min(sqnrs)
    if preds_ref is not None:
        m.top1_agreement = float((preds_ref == preds_opt).mean())
        if labels is not None and len(labels) >= len(preds_ref):
            lab = labels.reshape(-1)[:len(preds_ref)]  # a batch > 1 drops the last partial batch
            if (lab.dtype.kind in "USO") != (preds_ref.dtype.kind in "USO"):
                lab, preds_ref, preds_opt = lab.astype(str), preds_ref.astype(str), \
                    preds_opt.astype(str)
            m.accuracy_fp32 = float((preds_ref == lab).mean())
            m.accuracy_optimized = float((preds_opt == lab).mean())
            m.drop_points = 100.0 * (m.accuracy_fp32 - m.accuracy_optimized)
            m.basis = "accuracy vs labels"
        else:
            m.drop_points = 100.0 * (1.0 - m.top1_agreement)
            m.basis = "top-1 agreement with fp32"
        if n < MIN_TOP1_SAMPLES and m.min_cosine is not None:
            m.small_eval = True
            m.drop_points = fidelity_points(m.min_cosine, m.min_sqnr_db or 0.0)
            m.basis = (f"cosine and SQNR with fp32: {n} eval samples are too few for "
                       f"{'accuracy' if m.accuracy_fp32 is not None else 'top-1'} "
                       f"(under {MIN_TOP1_SAMPLES})")
    elif m.min_cosine is not None:
        # Regression: the larger of the relative error and the cosine loss, in points of 0-100.
        m.max_rel_error = max(rel)
        m.drop_points = 100.0 * max(0.0, 1.0 - m.min_cosine, min(1.0, m.max_rel_error))
        m.basis = "relative error and cosine similarity with fp32"
    return m


def measure_latency(session: Session, feed: dict[str, np.ndarray], *, warmup: int = 10,
                    min_runs: int = 50, max_runs: int = 2000, budget_s: float = 1.5) -> dict:
    """p50/p95/mean in milliseconds after warm-up; runs until ``budget_s`` or ``max_runs``."""
    for _ in range(warmup):
        session.run(feed)
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or
                                     time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        session.run(feed)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "mean_ms": float(t.mean()), "runs": len(t)}


def measure_interleaved(sessions: dict[str, Session], feed: dict[str, np.ndarray], *,
                        rounds: int = 6, budget_s: float = 1.2, min_runs: int = 5,
                        warmup: int = 5, settle_s: float = 0.03, discard: int = 1,
                        reference: str | None = None) -> dict[str, dict]:
    """p50/p95/mean per session, timed in rotating rounds so drift hits every model alike.

    Before each slot the process sleeps ``settle_s`` and runs ``discard`` untimed inferences:
    onnxruntime's worker threads spin for a while after a run, and the previous session's
    spinning threads would otherwise take the cores from the next one (measured on two cores:
    fp32 encoder 23 ms in turn vs 12 ms alone, which made int8 look 1.76x faster, not 1.13x).

    With ``reference`` (a session's name), every other session's ``p50_ms`` is paired with it:
    the reference's p50 times the median over rounds of (its slot's median / the reference's
    slot median in the same round), so load that comes and goes between rounds cancels out
    (the pooled figure stays as ``pooled_p50_ms``).
    """
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    slot = budget_s / (rounds * len(names))
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sess, acc = sessions[name], times[name]
            time.sleep(settle_s)
            for _ in range(discard):
                sess.run(feed)
            end = time.perf_counter() + slot
            n = 0
            while n < min_runs or time.perf_counter() < end:
                t0 = time.perf_counter()
                sess.run(feed)
                acc.append((time.perf_counter() - t0) * 1e3)
                n += 1
            per_round[name].append(float(np.median(acc[-n:])))
    out = {}
    for name, t in times.items():
        a = np.array(t)
        out[name] = {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                     "mean_ms": float(a.mean()), "runs": len(a)}
    if reference is not None:
        ref = np.array(per_round[reference])
        for name in names:
            if name != reference:
                ratio = float(np.median(np.array(per_round[name]) / ref))
                out[name]["pooled_p50_ms"] = out[name]["p50_ms"]
                out[name]["p50_ms"] = out[reference]["p50_ms"] * ratio
    return out


def rank_sensitive_nodes(fp32_bytes: bytes, qdq_bytes: bytes, data: Dataset,
                         batch: int = 1) -> list[tuple[str, float]]:
    """Nodes of the float model ordered by how much quantization noise each one adds (dB).

    For every node, SQNR lost = (worst SQNR of its inputs) − (SQNR of its output), where SQNR
    compares the QDQ model's activation against the float model's on the same samples.
    """
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg

    feeds = list(data.batches(batch))  # collect_activations iterates its reader

    with tempfile.TemporaryDirectory(prefix="edgepack-dbg-") as tmp:
        f_in, q_in = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        f_aug, q_aug = Path(tmp) / "fa.onnx", Path(tmp) / "qa.onnx"
        f_in.write_bytes(fp32_bytes)
        q_in.write_bytes(qdq_bytes)
        dbg.modify_model_output_intermediate_tensors(str(f_in), str(f_aug))
        dbg.modify_model_output_intermediate_tensors(str(q_in), str(q_aug))
        f_act = dbg.collect_activations(str(f_aug), iter(feeds))
        q_act = dbg.collect_activations(str(q_aug), iter(feeds))
    match = dbg.create_activation_matching(q_act, f_act)
    sqnr: dict[str, float] = {}
    for name, m in match.items():
        if m.get("float") and m.get("post_qdq"):
            v = float(dbg.compute_signal_to_quantization_noice_ratio(m["float"], m["post_qdq"]))
            sqnr[name] = v if math.isfinite(v) else 200.0
    model = onnx.load_from_string(fp32_bytes)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    losses = []
    for node in model.graph.node:
        outs = [sqnr[o] for o in node.output if o in sqnr]
        if not outs:
            continue
        # The quantizer fuses e.g. Conv+Relu: the Conv's output is never quantized, so its noise
        # shows at the Relu. Charge the whole fused chain and keep all of it in float.
        group, frontier, ins = [node.name], list(node.input), []
        while frontier:
            t = frontier.pop()
            if t in sqnr:
                ins.append(sqnr[t])
            elif t in producer and t not in inits and producer[t].name not in group:
                group.append(producer[t].name)
                frontier.extend(producer[t].input)
        loss = (min(ins) if ins else 200.0) - min(outs)
        losses.extend((name, loss) for name in group)
    losses.sort(key=lambda x: -x[1])
    seen: set[str] = set()
    return [x for x in losses if not (x[0] in seen or seen.add(x[0]))]
