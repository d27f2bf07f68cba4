"""The TFLite Micro arena search, run in a child process.

TFLite Micro's Python interpreter crashes the process (a C++ abort or SIGSEGV, "All temp buffers
must be freed…") for some arena sizes just below the smallest that works, instead of raising.
So the search runs here, in ``python -I -m edgepack.host.build.tflm_probe DIR``: every probe is
written to ``DIR/progress`` *before* it runs (``try SIZE``) and after (``ok SIZE`` / ``bad SIZE
reason``). When the child dies, the parent (:func:`edgepack.host.build.tflite_intake.
check_with_tflm`) counts the size it was trying as too small and starts a new child from what
is known, until the search ends. ``DIR`` holds ``model.tflite``, ``feeds.npz`` (``arr_0`` …),
``state.json`` (``good``, ``bad``, ``max_arena``, ``n_out``); the child leaves ``outputs.npz``
(the outputs at the smallest working arena), ``log`` (TFLM's messages) and ``done``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["search"]

ALIGN = 16  # TFLM aligns arena buffers to 16 bytes: no point bisecting finer


def _run(data: bytes, arena: int, feeds: list[np.ndarray], n_out: int) -> tuple:
    from tflite_micro.python.tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(data, arena_size=arena)
    for i, x in enumerate(feeds):
        it.set_input(x, i)
    it.invoke()
    return tuple(np.array(it.get_output(i)) for i in range(n_out))


def search(d: Path) -> None:
    """Grow the arena until the model runs, then bisect down to 16 bytes, from ``state.json``."""
    from edgepack.host.build.tflite_intake import captured_output

    state = json.loads((d / "state.json").read_text())
    good, bad, n_out = int(state["good"]), int(state["bad"]), int(state["n_out"])
    max_arena = int(state["max_arena"])
    data = (d / "model.tflite").read_bytes()
    with np.load(d / "feeds.npz") as z:
        feeds = [z[f"arr_{i}"] for i in range(len(z.files))]
    progress = open(d / "progress", "a", buffering=1)  # noqa: SIM115 (line-buffered log)
    outputs: tuple = ()

    def probe(size: int) -> bool:
        nonlocal outputs
        progress.write(f"try {size}\n")
        progress.flush()
        try:
            outputs = _run(data, size, feeds, n_out)
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            progress.write(f"bad {size} {first}\n")
            return False
        progress.write(f"ok {size}\n")
        return True

    with captured_output() as log:
        if not good:
            size = max(4096, ALIGN * (len(data) // ALIGN // 4 + 1)) if not bad else bad * 2
            while size <= max_arena:  # grow until it runs
                if probe(size):
                    good = size
                    break
                bad, size = size, size * 2
        while good and good - bad > ALIGN:  # then bisect down to 16 bytes
            mid = (bad + good) // 2 // ALIGN * ALIGN
            if probe(mid):
                good = mid
            else:
                bad = mid
        if good and not outputs:
            probe(good)
    (d / "log").write_text("\n".join(log))
    if good:
        np.savez(d / "outputs.npz", *outputs)
    (d / "done").write_text(str(good))
    progress.close()


if __name__ == "__main__":
    search(Path(sys.argv[1]))
