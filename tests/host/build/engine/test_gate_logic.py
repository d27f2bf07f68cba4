"""The gate's verdict and the host's variant choice, as pure logic (no models, no timing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.host.build.choose import EQUAL_SIZE, EQUAL_SPEED, Variant, choose_on_host
from edgepack.host.build.data import TensorSpec
from edgepack.host.build.validate import MIN_TOP1_SAMPLES, Outputs, compare, fidelity_points

PROBS = (TensorSpec("probs", "float32", (None, 4)),)
VALUE = (TensorSpec("y", "float32", (None, 1)),)


def _probs(n: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, 4))
    e = np.exp(logits)
    p = (e / e.sum(1, keepdims=True)).astype(np.float32)
    p[0] = [0.40, 0.3999, 0.1, 0.1001]  # a near tie: int8 noise may flip it
    return p


def _flip_one(p: np.ndarray) -> np.ndarray:
    """The same outputs, with sample 0's near tie flipped."""
    q = p.copy()
    order = np.argsort(q[0])
    q[0, order[-1]], q[0, order[-2]] = q[0, order[-2]] - 1e-4, q[0, order[-1]] + 1e-4
    return q


# ------------------------------------------------------------------ compare: which basis

def test_regression_is_gated_by_relative_error_and_cosine_not_top1() -> None:
    ref = np.linspace(1.0, 200.0, 64, dtype=np.float32)[:, None]
    m = compare(VALUE, Outputs([ref]), Outputs([ref * 1.002]), None)

    assert m.top1_agreement is None
    assert m.basis == "relative error and cosine similarity with fp32"
    assert m.max_rel_error == pytest.approx(0.002, rel=1e-3)
    assert m.drop_points == pytest.approx(0.2, rel=1e-2)  # not "200 points"


def test_large_eval_set_classifier_is_gated_by_top1() -> None:
    p = _probs(100)
    m = compare(PROBS, Outputs([p]), Outputs([_flip_one(p)]), None)

    assert not m.small_eval
    assert m.basis == "top-1 agreement with fp32"
    assert m.drop_points == pytest.approx(1.0)


def test_large_eval_set_with_labels_is_gated_by_accuracy() -> None:
    p = _probs(100)
    labels = p.argmax(1)
    m = compare(PROBS, Outputs([p]), Outputs([_flip_one(p)]), labels)

    assert m.basis == "accuracy vs labels"
    assert m.accuracy_fp32 == 1.0 and m.accuracy_optimized == pytest.approx(0.99)
    assert m.drop_points == pytest.approx(1.0)


def test_small_eval_set_is_gated_by_cosine_and_sqnr_not_one_flip() -> None:
    n = MIN_TOP1_SAMPLES - 1
    p = _probs(n)
    m = compare(PROBS, Outputs([p]), Outputs([_flip_one(p)]), None)

    assert m.small_eval
    assert m.top1_agreement == pytest.approx(1 - 1 / n)  # still reported
    assert "too few for top-1" in m.basis and str(n) in m.basis
    assert m.drop_points == pytest.approx(fidelity_points(m.min_cosine, m.min_sqnr_db))
    assert m.drop_points < 0.01  # one flip on near-identical outputs is no loss


def test_small_eval_set_still_fails_real_damage() -> None:
    p = _probs(16)
    noisy = p + np.random.default_rng(1).normal(scale=0.2, size=p.shape).astype(np.float32)
    m = compare(PROBS, Outputs([p]), Outputs([noisy]), p.argmax(1))

    assert m.small_eval and "accuracy" in m.basis
    assert m.drop_points > 1.0


def test_fidelity_points_scale() -> None:
    assert fidelity_points(1.0, 200.0) == pytest.approx(0.0, abs=1e-12)
    assert fidelity_points(0.99, 60.0) == pytest.approx(1.0)
    assert fidelity_points(1.0, 20.0) == pytest.approx(1.0)
    assert fidelity_points(0.0, -10.0) == 100.0


# ------------------------------------------------------------------ choose_on_host

def _v(label: str, mode: str, size: int, p50: float, passed: bool = True,
       default: bool = False) -> Variant:
    return Variant(label, mode, size, p50, 0.0 if passed else 5.0, passed, default)


def test_int8_slower_than_fp32_never_ships() -> None:
    vs = [_v("fp32", "none", 400, 1.0), _v("dynamic", "dynamic", 100, 1.3),
          _v("QDQ", "int8", 100, 1.35, default=True)]
    c = choose_on_host(vs)

    assert c is not None and c.winner == 0
    assert c.results[1].startswith("slower than fp32") and c.results[2].startswith("slower than")
    assert not c.slower_than_fp32


def test_forced_int8_ships_even_when_slower_and_says_so() -> None:
    vs = [_v("QDQ", "int8", 100, 1.35, default=True), _v("fp32", "none", 400, 1.0)]
    c = choose_on_host(vs, forced=True)

    assert c is not None and c.winner == 0
    assert c.slower_than_fp32
    assert c.results[1].startswith("fp32 reference")


def test_fastest_passing_wins() -> None:
    vs = [_v("fp32", "none", 400, 1.0), _v("dyn", "dynamic", 100, 0.8),
          _v("QDQ", "int8", 100, 0.5, default=True), _v("QOp", "int8", 100, 0.3, passed=False)]
    c = choose_on_host(vs)

    assert c is not None and c.winner == 2
    assert c.results[3].startswith("gate:")
    assert c.results[1].startswith("slower:")


def test_smaller_wins_at_equal_speed() -> None:
    fast = 1.0
    vs = [_v("fp32", "none", 400, fast), _v("dyn", "dynamic", 100, fast * (EQUAL_SPEED - 0.05))]
    # dynamic is slower than fp32 here: never shipped over fp32, however small
    assert choose_on_host(vs).winner == 0  # type: ignore[union-attr]
    vs = [_v("fp32", "none", 400, fast), _v("dyn", "dynamic", 100, fast * 0.99),
          _v("QDQ", "int8", 380, fast * 0.95)]
    c = choose_on_host(vs)

    assert c is not None and c.winner == 1  # within EQUAL_SPEED of the fastest, 3.8x smaller
    assert "the smaller ships" in c.why and "the smaller ships" in c.results[2]


def test_default_scheme_kept_among_equals() -> None:
    vs = [_v("fp32", "none", 400, 2.0), _v("QDQ-default", "int8", 100, 1.0, default=True),
          _v("QDQ-other", "int8", math.ceil(100 / EQUAL_SIZE), 1.0 / (EQUAL_SPEED - 0.05))]
    c = choose_on_host(vs)

    assert c is not None and c.winner == 1
    assert "default kept" in c.why and "default kept" in c.results[2]


def test_nothing_passes() -> None:
    assert choose_on_host([_v("QDQ", "int8", 100, 1.0, passed=False)]) is None


def test_ungated_candidates_never_ship_and_say_why() -> None:
    vs = [_v("fp32", "none", 400, 1.0), _v("QDQ", "int8", 100, 0.5, default=True),
          Variant("dyn", "dynamic", 90, 0.8, float("nan"), False, gated=False),
          Variant("QOp", "int8", 100, 1.2, float("nan"), False, gated=False)]
    c = choose_on_host(vs)

    assert c is not None and c.winner == 1
    assert c.results[2] == "slower: p50 1.60x of chosen; not gated (it could not win)"
    assert c.results[3].startswith("slower: 0.83x of fp32 speed; not gated")
