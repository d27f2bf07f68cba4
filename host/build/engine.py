"""The build engine: plan → import → pre-flight → optimize → gate → choose → package.

Calibration data is asked for after import, when the model turns out to need it
(:func:`~edgepack.host.build.plan.check_imported`).

:func:`run` drives the stages for one :class:`~edgepack.host.build.plan.BuildPlan`; the format
backend (:mod:`edgepack.host.build.backends`) does what differs between ONNX, TFLite and TFLite
Micro, the shared stages (:mod:`~edgepack.host.build.gate`, :mod:`~edgepack.host.build.package`)
what does not. The model is imported and pre-flighted once, however many candidates follow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgepack.agent.errors import ModelError
from edgepack.host.build.backends import Backend, Baseline, backend_for
from edgepack.host.build.drift_reference import reference_member
from edgepack.host.build.package import package
from edgepack.host.build.plan import BuildPlan, check_imported
from edgepack.host.build.report import Progress
from edgepack.host.build.result import BuildResult

__all__ = ["finish", "run"]


def run(plan: BuildPlan, progress: Progress | None = None, *,
        imported: Any = None) -> BuildResult:
    """Build ``plan``'s signed bundle; raises EdgepackError subclasses on bad input.

    ``imported`` skips the import stage (an :class:`~edgepack.host.build.importers.Imported`
    made elsewhere).
    """
    progress = progress or Progress(enabled=False)
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        work = Path(tmp)
        src, keras_pruning = _prune_keras_source(plan, work, progress)
        backend = backend_for(plan)
        if plan.profile_on.devices:
            backend.device_candidates(plan)  # a format devices cannot choose for fails here
        if imported is None:
            from edgepack.host.build.importers import import_model

            with progress.stage("import"):
                imported = import_model(src, workdir=work, opset=plan.profile.runtime.opset,
                                        sample_input=plan.data.sample_input)
        check_imported(plan, imported)  # calibration is asked for only when the model needs it
        base = backend.prepare(plan, imported, work, progress)
        if plan.profile_on.devices and backend.device_candidates(plan):
            from edgepack.host.build.choose import choose_on_devices

            return choose_on_devices(backend, base, plan, work, progress)
        return finish(backend, base, plan, progress, keras_pruning)


def finish(backend: Backend, base: Baseline, plan: BuildPlan, progress: Progress,
           keras_pruning: dict | None = None) -> BuildResult:
    """Optimize and gate one candidate of ``base`` as ``plan`` asks, and package it."""
    optimized = backend.optimize(base, plan, progress)
    asm = backend.assemble(base, optimized, plan, progress)
    if keras_pruning and asm.report.pruning is not None:
        asm.report.pruning["keras_fine_tuning"] = keras_pruning
    member, entry = reference_member(asm.drift, why_not=asm.drift_skipped)
    asm.report.model["drift"] = entry
    return package(plan, asm.manifest, asm.model_bytes, {**asm.files, **member}, asm.golden,
                   asm.report, progress)


def _prune_keras_source(plan: BuildPlan, work: Path, progress: Progress
                        ) -> tuple[Path, dict | None]:
    """Pruning with training data on a Keras model: prune while fine-tuning, before export."""
    src, sparsity, train = plan.model, plan.prune.sparsity, plan.prune.train
    if sparsity is None or train is None:
        return src, None
    from edgepack.host.build.importers import detect_kind

    if detect_kind(src) != "keras":
        raise ModelError("`train=` fine-tunes Keras models only; for other models drop "
                         "`train=` (one-shot magnitude pruning under the accuracy gate)",
                         field="train")
    from edgepack.host.build.distill import load_teacher, load_training_npz
    from edgepack.host.build.prune import prune_keras

    with progress.stage(f"pruning to {sparsity:.0%} with fine-tuning"):
        model = load_teacher(src, what="model")
        x, y = load_training_npz(train, model, field="train")
        _, result = prune_keras(model, sparsity, (x, y))
    out = work / f"{src.stem}-pruned.keras"
    out.write_bytes(result.model_bytes)
    return out, {"sparsity": result.sparsity_achieved, "notes": list(result.notes),
                 "fine_tuned_on": Path(train).name}
