"""The build wing: model in, signed bundle out.

::

    plan.py        arguments + target profile → frozen BuildPlan (configs split by concern)
    importers/     import: one module per input format behind a registry (detect → load)
    backends/      pre-flight, optimize, assemble per format: onnx, tflite, tflm (one interface)
    gate.py        budgets, the gate's verdict and host warnings, shared by every format
    choose.py      choose with devices in the loop (profile_on=), from the candidates built
    package.py     manifest, golden samples, report.json, signature → the bundle
    engine.py      runs the stages in order; result.py: BuildResult, BuildReport
    quantize.py, prune.py, distill.py, convert_onnx.py, convert_tflite.py, edgetpu.py,
    tflm.py, validate.py, data.py: the tools the stages use

The package is callable: ``edgepack.host.build(model, target=...)`` is :func:`build`, as is
``from edgepack.host.build import build``. Nothing heavy is imported until a build runs.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgepack.host.build.report import Progress
    from edgepack.host.build.result import BuildResult

__all__ = ["build"]


def build(model: str | Any, *, target: str, calibration: str | None = None,
          eval: str | None = None, key: str | None = None,  # noqa: A002
          out: str = "dist", progress: Progress | None = None, verbose: bool = False,
          **options: Any) -> BuildResult:
    """Import, optimize, gate and package ``model`` for ``target``; return the signed bundle.

    ``calibration`` / ``eval`` are ``.npz`` files keyed by input name (``eval`` may hold
    ``labels``), ``key`` the Ed25519 private key to sign with, ``out`` the output directory.
    ``options`` are the other keywords of :func:`edgepack.host.build.plan.make_plan`
    (``quantize``, ``max_drop``, ``name``, ``version``, ``format``, ``prune``, ``profile_on``,
    ``broker``…). Raises :class:`~edgepack.agent.errors.EdgepackError` subclasses whose
    ``context["field"]`` names the argument at fault.

    What the libraries print while it runs (warnings, log records, C++ logs) goes into the
    report's ``third_party_output``, as with the CLI; ``verbose=True`` lets it through as it
    comes. A ``progress`` of your own decides that itself.
    """
    from edgepack.host.build.engine import run
    from edgepack.host.build.noise import ThirdPartyOutput
    from edgepack.host.build.plan import make_plan
    from edgepack.host.build.report import Progress

    plan = make_plan(model, target=target, calibration=calibration, eval=eval, key=key, out=out,
                     **options)
    if progress is not None:
        return run(plan, progress)
    with Progress(enabled=False, third_party=ThirdPartyOutput(live=verbose)) as quiet:
        return run(plan, quiet)


class _CallableModule(types.ModuleType):
    """``edgepack.host.build(...)`` calls :func:`build` (the package and the function share a
    name: importing any submodule binds the package to ``edgepack.host.build``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> BuildResult:
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
