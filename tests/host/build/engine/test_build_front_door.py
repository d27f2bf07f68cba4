"""The Python front door: ``edgepack.host.build(model, target=..., ...)`` returns a typed
:class:`BuildResult`; mistakes are EdgepackErrors naming the keyword argument, not a flag."""

from __future__ import annotations

import json
import zipfile

import pytest

import edgepack.host as host
from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import DataError, EdgepackError
from edgepack.agent.signing import load_public_keys
from edgepack.host.build import build
from edgepack.host.build.result import BuildReport, BuildResult


def test_host_build_is_callable_and_returns_a_verified_bundle(mlp, keys, tmp_path):
    import edgepack.host.build.engine  # noqa: F401  (a submodule import must not shadow it)

    result = host.build(str(mlp.model), target="rpi4", quantize="int8",
                        calibration=str(mlp.calib), eval=str(mlp.eval),
                        key=str(keys.private), out=str(tmp_path), variants=False)

    assert isinstance(result, BuildResult) and isinstance(result.report, BuildReport)
    bundle = read_bundle(result.path)
    assert bundle.verify(load_public_keys([keys.public]))
    assert bundle.bundle_id == result.bundle_id
    assert result.manifest["model"]["sha256"] == bundle.manifest["model"]["sha256"]
    with zipfile.ZipFile(result.path) as zf:
        member = json.loads(zf.read("report.json"))
    returned = json.loads(json.dumps(result.report.to_dict(), default=float))
    assert {k: v for k, v in returned.items() if k not in ("bundle", "timings_s")} == \
        {k: v for k, v in member.items() if k != "timings_s"}


def test_int8_without_calibration_names_the_keyword(mlp, tmp_path):
    with pytest.raises(DataError) as err:
        build(str(mlp.model), target="rpi4", quantize="int8", out=str(tmp_path))

    assert isinstance(err.value, EdgepackError)
    assert "`calibration=`" in err.value.message
    assert "--" not in err.value.message
    assert err.value.context["field"] == "calibration"
    assert not any(tmp_path.iterdir())


def test_profile_on_without_broker_names_the_keyword(mlp, keys, tmp_path):
    with pytest.raises(DataError, match="`broker=`") as err:
        build(str(mlp.model), target="x86-64-vnni", quantize="none", key=str(keys.private),
              out=str(tmp_path), profile_on=["pi-x"])

    assert "--" not in err.value.message
    assert err.value.context["field"] == "broker"
