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
    from edgepack.host.build.engine import run
    from edgepack.host.build.plan import make_plan

    imported = kw.pop("imported", None) or sm.imported()
    plan = make_plan(sm.dir, target=target, calibration=str(sm.calib), eval=str(sm.eval),
                     out=str(out), name="digits", **kw)
    return run(plan, imported=imported)
