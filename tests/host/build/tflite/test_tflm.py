"""TFLite Micro output: C sources that compile and round-trip, the arena plan, budgets."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from tflite_helpers import SavedModel, build

from edgepack.agent.bundle import read_bundle
from edgepack.agent.errors import BudgetError
from edgepack.host.build.tflm import plan_arena, resolver_ops

HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "model_data.h"

int main(int argc, char** argv) {
  if (reinterpret_cast<unsigned long>(g_model_data) % 16 != 0) return 3;
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 4;
  std::vector<unsigned char> buf(g_model_data_len + 1);
  size_t n = std::fread(buf.data(), 1, buf.size(), f);
  std::fclose(f);
  if (n != g_model_data_len) return 5;
  return std::memcmp(buf.data(), g_model_data, n) == 0 ? 0 : 6;
}
"""

# Just enough of TFLM's API for model_config.h to compile: one method per resolver call.
STUB = """
#pragma once
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
template <unsigned int N> class MicroMutableOpResolver {
 public:
  unsigned int count = 0;
%s
};
}
"""


@pytest.fixture(scope="module")
def sources(esp32_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("src")
    with zipfile.ZipFile(esp32_build.path) as zf:
        for name in zf.namelist():
            if name.startswith("tflm/") or name == "model.tflite":
                (d / Path(name).name).write_bytes(zf.read(name))
    return d


def test_tflm_bundle(esp32_build) -> None:
    m = read_bundle(esp32_build.path).manifest
    assert m["model"]["format"] == "tflm" and m["runtime"]["name"] == "tflm"
    assert {"tflm/model_data.cc", "tflm/model_data.h", "tflm/model_config.h"} <= set(m["files"])
    assert m["model"]["inputs"][0]["dtype"] == "int8"
    assert m["model"]["inputs"][0]["quantization"]["scale"] > 0
    assert m["metrics"]["drop_points"] <= 2.0
    # arena_kb: TFLM's measured allocation plus the margin, within the profile's 300 KiB budget
    measured = esp32_build.report.tflm["measured_arena"]
    assert m["budgets"]["arena_kb"] == measured["arena_kb"] == esp32_build.report.tflm["arena_kb"]
    assert 0 < m["budgets"]["arena_kb"] <= 300


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_c_sources_compile_and_round_trip(sources: Path, tmp_path: Path) -> None:
    subprocess.run(["gcc", "-c", "-std=c++11", "-Wall", "-Werror", str(sources / "model_data.cc"),
                    "-o", str(tmp_path / "model_data.o")], check=True)
    (tmp_path / "harness.cc").write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(["g++", "-std=c++11", f"-I{sources}", str(tmp_path / "harness.cc"),
                    str(tmp_path / "model_data.o"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe), str(sources / "model.tflite")])
    assert r.returncode == 0, f"round trip failed with code {r.returncode}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_model_config_compiles_against_the_resolver_api(sources: Path, tmp_path: Path) -> None:
    config = (sources / "model_config.h").read_text()
    methods = sorted(set(re.findall(r"resolver\.(Add\w+)\(\)", config)))
    assert "AddConv2D" in methods and "AddFullyConnected" in methods
    inc = tmp_path / "tensorflow" / "lite" / "micro"
    inc.mkdir(parents=True)
    body = "\n".join(f"  TfLiteStatus {m}() {{ return ++count <= N ? kTfLiteOk : kTfLiteError; }}"
                     for m in methods)
    (inc / "micro_mutable_op_resolver.h").write_text(STUB % body)
    (tmp_path / "t.cc").write_text(
        '#include "model_config.h"\n'
        "int main() { edgepack_model::OpResolver r;\n"
        "  static_assert(edgepack_model::kTensorArenaSize >= edgepack_model::kArenaEstimateBytes,"
        ' "margin");\n'
        "  return edgepack_model::RegisterOps(r) == kTfLiteOk &&\n"
        "         edgepack_model::kInputElements == 64 ? 0 : 1; }\n")
    subprocess.run(["g++", "-std=c++11", "-Wall", "-Werror", f"-I{tmp_path}", f"-I{sources}",
                    str(tmp_path / "t.cc"), "-o", str(tmp_path / "t")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def test_arena_estimate_is_sane(esp32_build) -> None:
    plan = plan_arena(esp32_build.model_bytes, kernels="reference")
    assert plan.largest_tensor_bytes <= plan.activation_bytes <= plan.sum_tensor_bytes
    assert plan.activation_bytes < plan.sum_tensor_bytes  # lifetimes let buffers share space
    full = plan_arena(esp32_build.model_bytes)
    assert full.arena_bytes > full.largest_tensor_bytes
    assert full.recommended_bytes >= full.arena_bytes
    # Planned buffers never overlap in both time and space.
    bufs = full.buffers
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            if a.first <= b.last and b.first <= a.last:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset


def test_arena_plan_matches_tflm_interpreter(esp32_build) -> None:
    check = esp32_build.report.tflm["host_check"]
    if not check["ran"]:
        pytest.skip(check["why"])
    plan = plan_arena(esp32_build.model_bytes, kernels="reference")
    # The head is TFLM's planned activation area: same planner, same model, same bytes.
    assert check["host_arena_head_bytes"] == plan.activation_bytes
    assert check["top1_agreement_vs_litert"] >= 0.9


def test_resolver_lists_each_op_once(esp32_build) -> None:
    ops = resolver_ops(esp32_build.model_bytes)
    assert len({m for _, m, _ in ops}) == len(ops)
    cfg = esp32_build.report.tflm["resolver"]
    assert [r["method"] for r in cfg] == [m for _, m, _ in ops]


def test_activations_over_mcu_arena(big_act: SavedModel, tmp_path: Path) -> None:
    with pytest.raises(BudgetError) as e:
        build(big_act, "cortex-m4", tmp_path, max_drop=100.0)
    msg = str(e.value)
    assert "arena" in msg and "KiB" in msg and "160" in msg


def test_float_tflite_with_calibration_becomes_int8_in_the_gate(cnn: SavedModel, cnn_fp32: bytes,
                                                                 tmp_path: Path) -> None:
    """A float .tflite (no SavedModel behind it) plus calibration data: ai-edge-quantizer's int8,
    gated against the float model on the eval set, validated in TFLite Micro."""
    import edgepack.host as ep

    (tmp_path / "digits.tflite").write_bytes(cnn_fp32)
    r = ep.build(str(tmp_path / "digits.tflite"), target="esp32-s3", calibration=str(cnn.calib),
                 eval=str(cnn.eval), out=str(tmp_path / "o"))
    m = read_bundle(r.path).manifest
    assert m["model"]["format"] == "tflm" and m["optimization"]["dtype"] == "int8"
    assert m["optimization"]["tool"] == "ai-edge-quantizer"
    assert m["metrics"]["accuracy_fp32"] > 0.9 and m["metrics"]["drop_points"] <= 2.0
    assert m["metrics"]["size_ratio"] > 3.0
    assert r.report.tflm["measured_arena"]["measured"]
