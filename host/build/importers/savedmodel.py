"""TensorFlow SavedModel directories: tf2onnx (ONNX) plus the directory itself (TFLite).

TensorFlow and tf2onnx run inside the functions that need them (tf2onnx in a child process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import ModelError
from edgepack.host.build.importers.base import Imported
from edgepack.host.build.importers.check import float_only, load_onnx, random_feeds, verify

__all__ = ["import_tf", "load", "single_output", "tf2onnx", "tf_result"]

_TF2ONNX_TIMEOUT = 1800  # seconds; big SavedModels take minutes, a hung converter must not hang CI


def _tf_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def tf2onnx(saved_model: Path, out: Path, opset: int, workdir: Path, what: str) -> list[str]:
    """SavedModel → ONNX in a child process (TensorFlow's graph state stays out of ours), then
    through the ONNX intake's repairs (tf2onnx writes exact GELU with ``Erfc``, no ONNX op).

    Returns what the intake changed, for the import notes.
    """
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
           "--output", str(out), "--opset", str(opset)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_tf_env(),
                           timeout=_TF2ONNX_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ModelError(f"tf2onnx did not finish converting {what} within "
                         f"{_TF2ONNX_TIMEOUT} s", stage="import") from None
    if r.returncode == 0 and out.is_file():
        return _repair(out, what)
    log = workdir / "tf2onnx.log"
    log.write_text(r.stdout + r.stderr)
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception)\b", ln)]
    reason = (errors or lines or ["no output"])[-1]
    raise ModelError(f"tf2onnx could not convert {what} to ONNX opset {opset}: {reason[:400]} "
                     f"(full log: {log})", stage="import")


def _repair(path: Path, what: str) -> list[str]:
    """Run tf2onnx's output through ``onnx_intake`` (repairs, constant folding) in place."""
    from edgepack.host.build.onnx_intake import prepare_onnx, save_onnx

    taken = prepare_onnx(path)
    if taken.steps:
        save_onnx(taken.model, path)
    return [f"tf2onnx output of {what}: {step}" for step in taken.steps]


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def single_output(out: Any) -> list[Any]:
    """One output compared; several are skipped (their ONNX order is tf2onnx's, not ours)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        if len(out) != 1:
            raise ValueError(f"{len(out)} outputs: only single-output models are checked")
        out = out[0]
    return [np.asarray(out)]


def load(src: Path, *, workdir: Path, opset: int, sample_input: str | None) -> Imported:
    """A SavedModel directory (signature ``serving_default``)."""
    onnx_path = workdir / f"{src.resolve().name or 'saved_model'}.onnx"
    repairs = tf2onnx(src, onnx_path, opset, workdir, f"SavedModel {src}")
    notes = [f"TensorFlow SavedModel → tf2onnx opset {opset} (signature serving_default)",
             *repairs]
    notes.append(verify(onnx_path, _saved_model_reference(src), random_feeds(onnx_path),
                         "the SavedModel"))
    return tf_result("saved_model", src, onnx_path, src, notes)


def _saved_model_reference(src: Path) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        tf = import_tf()
        fn = tf.saved_model.load(str(src)).signatures["serving_default"]
        names = list(fn.structured_input_signature[1])
        if sorted(names) != sorted(feeds):
            raise ValueError(f"signature inputs {names} differ from ONNX inputs {list(feeds)}")
        return single_output(fn(**{k: tf.constant(v) for k, v in feeds.items()}))

    return run


def tf_result(kind: str, src: Path, onnx_path: Path, saved: Path,
               notes: list[str]) -> Imported:
    reason = float_only(load_onnx(onnx_path), src.name)
    if reason:
        notes.append(reason)
    return Imported(kind, src, onnx_path, saved, None, reason is not None, tuple(notes))
