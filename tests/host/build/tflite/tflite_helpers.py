"""Helpers the TFLite tests import (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class SavedModel:
    dir: Path
    calib: Path
    eval: Path

    def imported(self) -> Any:
        """What ``import_model`` returns for a Keras/SavedModel input."""
        return SimpleNamespace(kind="saved_model", source=str(self.dir), onnx_path=None,
                               saved_model_dir=str(self.dir), tflite_bytes=None,
                               float_only=False, notes=[])


def build(sm: SavedModel, target: str, out: Path, **kw: Any) -> Any:
    from edgepack.agent.profiles import load_profile
    from edgepack.host.build.pipeline import BuildConfig
    from edgepack.host.build.pipeline_tflite import run_tflite_build

    imported = kw.pop("imported", None) or sm.imported()
    cfg = BuildConfig(model=str(sm.dir), target=target, calibration=str(sm.calib),
                      eval_data=str(sm.eval), out_dir=str(out), name="digits", **kw)
    return run_tflite_build(cfg, load_profile(target), imported)
