"""CLI: ``edgepack build`` — flags become a build plan; the engine builds it; the report is
rendered."""

from __future__ import annotations

import contextlib
import sys

import click

from edgepack.host.cli.build import TargetType
from edgepack.host.cli.flags import as_flags

__all__ = ["build"]


@click.command("build")
@click.argument("model", type=click.Path(exists=True))
@click.option("--target", "-t", required=True, type=TargetType(), help="Device profile.")
@click.option("--quantize", type=click.Choice(["auto", "int8", "dynamic", "fp16", "none"]),
              default="auto", show_default=True, help="auto = the target profile's default.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="NPZ of calibration inputs keyed by input name.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--calibration-samples", type=click.IntRange(1), help="Cap on samples used.")
@click.option("--eval", "eval_data", type=click.Path(exists=True, dir_okay=False),
              help="NPZ of eval inputs (and optional 'labels') for the accuracy gate, or a CSV "
                   "with a header naming the inputs (PMML: field names; empty cell = missing).")
@click.option("--sample-input", type=click.Path(exists=True, dir_okay=False),
              help="NPZ with one input array: input type for scikit-learn models, and eval "
                   "inputs when --eval is absent (NPZ keyed by field name or CSV for PMML).")
@click.option("--max-drop", type=click.FloatRange(0), help="Max accuracy/agreement drop, points.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True,
              help="Fix a dynamic batch dimension to this size.")
@click.option("--name", help="Bundle name (default: the model file's stem).")
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--key", type=click.Path(exists=True, dir_okay=False),
              help="Ed25519 private key to sign with (unsigned without it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="dist",
              show_default=True)
@click.option("--fp16-io/--float32-io", "fp16_io", default=False, show_default=True,
              help="With --quantize fp16: make inputs/outputs float16 too (default keeps float32).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "tflm"]),
              help="Model format (default: the target's preferred one).")
@click.option("--tflite-io", type=click.Choice(["float32", "int8", "uint8"]),
              help="Full-int8 TFLite input/output type (default: the target's).")
@click.option("--prune", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Magnitude-prune to this sparsity (e.g. 0.5) before quantizing.")
@click.option("--train", type=click.Path(exists=True, dir_okay=False),
              help="With --prune on a Keras model: NPZ (x, y) to fine-tune on while pruning.")
@click.option("--profile-on", "profile_on", multiple=True, metavar="DEVICE",
              help="Let this device measure every candidate and ship the fastest that passes "
                   "the gate on its outputs (repeatable; needs --broker and --key).")
@click.option("--broker", envvar="EDGEPACK_BROKER", help="Broker of the --profile-on devices.")
@click.option("--fleet", default="default", show_default=True)
@click.option("--profile-timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds the devices get for the whole job.")
@click.option("--profile-runs", type=click.IntRange(5), default=50, show_default=True)
@click.option("--profile-cache", type=click.Path(dir_okay=False),
              help="Profile cache file (default ~/.cache/edgepack/profiles.json).")
@click.option("--fleet-db", metavar="URL",
              help="With --profile-on: fleet database with the devices' enrolled keys; their "
                   "results count only when signed by them (default: ./fleet.db if it exists).")
@click.option("--allow-non-tensor-outputs", is_flag=True,
              help="Ship sequence/map outputs (skl2onnx's ZipMap) as they are; only full "
                   "onnxruntime builds read them (default: refuse, outputs are tensors).")
@click.option("--no-variants", is_flag=True, help="Skip measuring the profile's candidate schemes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True,
              help="Show the libraries' own warnings and logs as they come (by default they "
                   "go into the bundle's report.json, third_party_output).")
def build(model: str, target: str, quantize: str, calibration: str | None,
          calibration_method: str | None, calibration_samples: int | None,
          eval_data: str | None, sample_input: str | None, max_drop: float | None, batch: int,
          name: str | None, version: str, key: str | None, out_dir: str, fp16_io: bool,
          fmt: str | None, tflite_io: str | None,
          prune: float | None, train: str | None, profile_on: tuple[str, ...],
          broker: str | None, fleet: str, profile_timeout: float, profile_runs: int,
          profile_cache: str | None, fleet_db: str | None, allow_non_tensor_outputs: bool,
          no_variants: bool,
          as_json: bool,
          quiet: bool, verbose: bool) -> None:
    """Import, optimize, validate and package MODEL for a target device."""
    from edgepack.host.build.engine import run
    from edgepack.host.build.noise import ThirdPartyOutput
    from edgepack.host.build.plan import make_plan
    from edgepack.host.build.report import Progress, render_build
    from edgepack.host.cli.main import emit

    plan = make_plan(model, target=target, quantize=quantize, calibration=calibration,
                     calibration_method=calibration_method,
                     calibration_samples=calibration_samples, eval=eval_data,
                     sample_input=sample_input, max_drop=max_drop, batch=batch, name=name,
                     version=version, key=key, out=out_dir, variants=not no_variants,
                     keep_io_types=not fp16_io, format=fmt, tflite_io=tflite_io, prune=prune,
                     train=train, profile_on=profile_on, broker=broker, fleet=fleet,
                     profile_timeout=profile_timeout, profile_runs=profile_runs,
                     profile_cache=profile_cache, fleet_db=fleet_db,
                     allow_non_tensor_outputs=allow_non_tensor_outputs)
    # Libraries print to stdout (onnxruntime's calibrators do); keep stdout pure for --json.
    with Progress(enabled=not (quiet or as_json),
                  third_party=ThirdPartyOutput(live=verbose)) as progress, \
            contextlib.redirect_stdout(sys.stderr):
        result = run(plan, progress)
    report = result.report.to_dict()
    if not as_json:  # warnings name arguments as `eval=`; people here type --eval
        report["warnings"] = [as_flags(w, build) for w in report.get("warnings", [])]
    emit(report, as_json, render_build)
    if result.report.device_profile and not as_json:
        from edgepack.host.cli.profile import render_choice

        render_choice(result.report.device_profile)
    third = report.get("third_party_output") or {}
    if third.get("count") and not third["shown_live"] and not as_json:
        click.echo(f"{third['count']} message(s) from the libraries edgepack calls are kept in "
                   "the bundle's report.json (third_party_output); --verbose shows them as "
                   "they come", err=True)
