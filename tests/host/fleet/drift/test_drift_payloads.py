"""Window payloads are hostile until checked: malformed or oversized ones are refused cleanly."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from edgepack.agent.errors import BundleError, ProtocolError
from edgepack.host.fleet.drift import (
    MAX_WINDOW_BYTES,
    decode_window,
    judge,
    load_reference,
    merge_windows,
)


def _sketch(n: int = 5000, k: int = 32) -> bytes:
    s = kll_floats_sketch(k)
    s.update(np.random.default_rng(0).random(n).astype(np.float32))
    return s.serialize()


def _window(**change: object) -> dict:
    payload = {"schema": "drift/1", "ref": "abc", "rate": 0.05, "calls": 100, "sampled": 5,
               "rows": 5, "s": {"i0.c0": base64.b64encode(_sketch()).decode()},
               "c": {"o0.cls": [1, 2, 2]}, "sum": {"o0.conf": 4.2}}
    payload.update(change)
    return payload


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def test_a_well_formed_window_decodes_from_bytes_text_or_object() -> None:
    for raw in (_window(), json.dumps(_window()), json.dumps(_window()).encode()):
        w = decode_window(raw)
        assert (w.reference_id, w.calls, w.sampled, w.rows) == ("abc", 100, 5, 5)
        assert w.counts == {"o0.cls": (1, 2, 2)} and w.sums == {"o0.conf": 4.2}
        assert kll_floats_sketch.deserialize(w.sketches["i0.c0"]).n == 5000


def _level_offsets_corrupted() -> bytes:
    blob = bytearray(_sketch())
    struct.pack_into("<I", blob, 20 + 4 * 4, 0x00DA0017)  # the offset that crashed the library
    return bytes(blob)


def _n_inflated() -> bytes:
    blob = bytearray(_sketch())
    blob[15] = 0x84  # n claims 2^63 items: the library hangs on it
    return bytes(blob)


@pytest.mark.parametrize(("raw", "field"), [
    (b"x" * (MAX_WINDOW_BYTES + 1), "drift"),
    (b"\xff\xfe not utf-8", "drift"),
    (b"{not json", "drift"),
    (b"[" * 50_000 + b"]" * 50_000, "drift"),
    (b"[1, 2]", "drift"),
    (_window(schema="drift/9"), "schema"),
    (_window(ref=["abc"]), "ref"),
    (_window(calls=-1), "calls"),
    (_window(rows=True), "rows"),
    (_window(calls=3, sampled=5), "sampled"),
    (_window(c={"o0.cls": [1, -2]}), "c.o0.cls"),
    (_window(c={"o0.cls": []}), "c.o0.cls"),
    (_window(c={"o0.cls": [1] * 5000}), "c.o0.cls"),
    (_window(c={"../../etc": [1]}), "c"),
    (_window(c={f"o{i}.cls": [1] for i in range(300)}), "c"),
    (_window(sum={"o0.conf": float("nan")}), "sum.o0.conf"),
    (_window(sum={"o0.conf": "4.2"}), "sum.o0.conf"),
    (_window(s={"i0.c0": "not base64!"}), "s.i0.c0"),
    (_window(s={"i0.c0": "A" * 20_000}), "s.i0.c0"),
    (_window(s={"i0.c0": _b64(_sketch()[:-4])}), "s.i0.c0"),
    (_window(s={"i0.c0": _b64(b"\x05\x01\x0f")}), "s.i0.c0"),
    (_window(s={"i0.c0": _b64(_level_offsets_corrupted())}), "s.i0.c0"),
    (_window(s={"i0.c0": _b64(_n_inflated())}), "s.i0.c0"),
    (_window(s={"i0.c0": _b64(_sketch(k=4000))}), "s.i0.c0"),
    (_window(s={"i0.c0": 12}), "s.i0.c0"),
    (_window(s=["i0.c0"]), "s"),
])
def test_malformed_windows_are_refused_with_the_field(raw: object, field: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_window(raw)
    assert e.value.context["field"] == field


def test_a_sketch_with_nan_items_is_refused() -> None:
    blob = bytearray(_sketch())
    struct.pack_into("<f", blob, len(blob) - 4, float("nan"))
    with pytest.raises(ProtocolError, match="not finite"):
        decode_window(_window(s={"i0.c0": _b64(bytes(blob))}))


def test_empty_and_single_item_sketches_are_accepted() -> None:
    empty, single = kll_floats_sketch(32), kll_floats_sketch(32)
    single.update(0.5)
    w = decode_window(_window(s={"i0.c0": _b64(empty.serialize()),
                                 "i0.px": _b64(single.serialize())}))
    assert kll_floats_sketch.deserialize(w.sketches["i0.px"]).get_quantile(0.5) == 0.5


def test_bins_that_do_not_fit_the_reference_are_refused(cnn) -> None:
    reference = load_reference(cnn.reference)
    with pytest.raises(ProtocolError, match="bins"):
        judge(reference, decode_window(_window(ref=reference.id, s={})))
    with pytest.raises(ProtocolError, match="disagree"):
        merge_windows([decode_window(_window()), decode_window(_window(c={"o0.cls": [1]}))])


def test_a_malformed_reference_is_a_bundle_error(cnn) -> None:
    with pytest.raises(BundleError, match="not JSON"):
        load_reference(b"{")
    with pytest.raises(BundleError, match="schema"):
        load_reference({"schema": "drift/1"})
    broken = json.loads(json.dumps(cnn.reference))
    broken["figures"]["i0.c0"]["expected"] = [1.0]
    with pytest.raises(BundleError, match="i0.c0: edges and expected masses") as e:
        load_reference(broken)
    assert e.value.context["field"] == "figures"


def test_fuzzed_sketches_never_crash_the_server() -> None:
    """Random mutations of real sketches: each is refused or decodes, merges and is judged.

    Runs in a child process: a sketch the checks let through that crashes the sketch library
    would kill it (a segfault cannot be caught), and the test sees the exit status.
    """
    child = textwrap.dedent("""
        import base64, random
        import numpy as np
        from datasketches import kll_floats_sketch
        from edgepack.agent.errors import ProtocolError
        from edgepack.host.fleet.drift import decode_window, merge_windows
        rng, R = np.random.default_rng(0), random.Random(1)
        bases = []
        for k, n in ((32, 5000), (32, 40), (200, 100000), (8, 3)):
            s = kll_floats_sketch(k)
            s.update(rng.random(n).astype(np.float32))
            bases.append(s.serialize())
        good = decode_window({"schema": "drift/1", "ref": "r", "calls": 1, "sampled": 1,
                              "rows": 1, "s": {"i0.c0": base64.b64encode(bases[0]).decode()}})
        accepted = refused = 0
        for i in range(6000):
            blob = bytearray(R.choice(bases))
            mode = i % 4
            if mode == 0:
                blob = blob[:R.randrange(len(blob))]
            elif mode == 1:
                for _ in range(R.randrange(1, 4)):
                    blob[R.randrange(len(blob))] = R.randrange(256)
            elif mode == 2:
                blob[R.randrange(min(40, len(blob)))] = R.randrange(256)
            else:
                blob = bytearray(R.randbytes(R.randrange(0, 120)))
            payload = {"schema": "drift/1", "ref": "r", "calls": 1, "sampled": 1, "rows": 1,
                       "s": {"i0.c0": base64.b64encode(bytes(blob)).decode()}}
            try:
                w = decode_window(payload)
            except ProtocolError:
                refused += 1
                continue
            accepted += 1
            m = merge_windows([good, w, w])
            s = kll_floats_sketch.deserialize(m.sketches["i0.c0"])
            s.get_cdf([0.25, 0.5], True)
            s.get_quantiles([0.1, 0.9])
        print(accepted, refused)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    accepted, refused = map(int, done.stdout.split())
    assert accepted > 100 and refused > 1000
