"""Install surface: light imports, the wheel, and the read-only CLI commands (targets, keys)."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.agent.profiles import list_targets
from edgepack.host.cli import main

ROOT = Path(__file__).resolve().parents[4]
HEAVY = ("tensorflow", "keras", "onnx", "onnxruntime", "tf2onnx", "skl2onnx", "sklearn")
REQUIRED_TARGETS = {"rpi4", "rpi5", "rpi-zero-2w", "jetson-orin-nano", "android-arm64",
                    "coral-edgetpu", "esp32-s3", "x86-64-avx2", "x86-64-vnni"}


def _modules_after(code: str) -> set[str]:
    """Top-level packages and edgepack modules loaded by ``code`` in a fresh interpreter."""
    probe = (code + "\nimport sys, json\n"
             "print('@@' + json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("@@"))
    return set(json.loads(line[2:]))


def _tops(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


@pytest.mark.parametrize("argv", [["--help"], ["build", "--help"]])
def test_help_imports_no_heavy_library(argv):
    mods = _modules_after(
        "from edgepack.host.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n")

    assert not _tops(mods) & set(HEAVY), sorted(_tops(mods) & set(HEAVY))
    assert "edgepack.host.cli" in mods


def test_agent_imports_no_host_tensorflow_or_onnx():
    mods = _modules_after(
        "import edgepack.agent, edgepack.agent.bundle, edgepack.agent.protocol, "
        "edgepack.agent.profiles, edgepack.agent.signing, edgepack.agent.errors")

    assert "edgepack.agent.bundle" in mods
    assert not _tops(mods) & {"tensorflow", "keras", "onnx", "tf2onnx"}
    assert not {m for m in mods if m.startswith("edgepack.host")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the source tree (the repo itself stays untouched)."""
    src = tmp_path_factory.mktemp("src") / "edgepack"
    skip = shutil.ignore_patterns(".git", ".venv", ".demo", "*.egg-info", "__pycache__",
                                  ".pytest_cache", ".ruff_cache")
    top = {"tests", "build", "dist", "bench", "docs", "keys"}  # host/build is the build wing

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(skip(folder, names)) | (top & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                        "--skip-dependency-check", "--outdir", str(out)],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = out.glob("edgepack-*.whl")
    return whl


def test_wheel_holds_edgepack_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))

    assert "edgepack/targets/rpi4.toml" in names
    assert {f"edgepack/targets/{t}.toml" for t in REQUIRED_TARGETS} <= set(names)
    assert "edgepack/agent/bundle.py" in names and "edgepack/host/build/engine.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"edgepack", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert not tops & {"host", "agent", "targets", "firmware_configs"}
    assert "edgepack = edgepack.host.cli:main" in entry_points


def test_profile_loads_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    # -S: no site-packages, so the editable install cannot answer instead of the wheel.
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import edgepack.agent.profiles as p\n"
            "prof = p.load_profile('rpi4')\n"
            "print(p.__file__); print(prof.name, prof.hardware.cores, prof.quantization.default)")

    r = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True,
                       text=True, timeout=60)

    assert r.returncode == 0, r.stderr
    module_file, summary = r.stdout.strip().splitlines()
    assert Path(module_file).resolve().is_relative_to(site.resolve())
    assert summary == "rpi4 4 int8"


def test_targets_list_json():
    result = CliRunner().invoke(main, ["targets", "list", "--json"])

    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} >= REQUIRED_TARGETS
    assert [r["name"] for r in rows] == list_targets()
    for r in rows:
        assert set(r) >= {"name", "description", "cpu", "ram_mb", "formats", "quantize"}
        assert r["formats"] and r["ram_mb"] > 0


def test_targets_list_table():
    result = CliRunner().invoke(main, ["targets", "list"])

    assert result.exit_code == 0, result.output
    assert "rpi4" in result.output and "x86-64-vnni" in result.output


def test_targets_show_json():
    result = CliRunner().invoke(main, ["targets", "show", "x86-64-vnni", "--json"])

    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["name"] == "x86-64-vnni"
    assert "avx512_vnni" in p["hardware"]["isa_features"]
    assert p["hardware"]["cpu_family"] == "x86_64"
    scheme = p["quantization"]["scheme"]
    assert (scheme["activation_type"], scheme["weight_type"]) == ("uint8", "int8")
    assert len(p["quantization"]["candidates"]) >= 2
    assert set(p["budgets"]) >= {"model_mb", "rss_mb", "p95_ms"}
    assert p["transfer"]["chunk_kb"] > 0


def test_targets_show_profile_file(tmp_path):
    text = (ROOT / "targets" / "rpi4.toml").read_text().replace('name = "rpi4"', 'name = "mine"')
    (tmp_path / "mine.toml").write_text(text)

    result = CliRunner().invoke(main, ["targets", "show", str(tmp_path / "mine.toml"), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["name"] == "mine"


def test_targets_show_unknown_is_a_usage_error():
    result = CliRunner().invoke(main, ["targets", "show", "rpi9"])

    assert result.exit_code == 2
    assert "unknown target 'rpi9'" in result.output and "rpi4" in result.output


def test_keys_generate(tmp_path):
    runner = CliRunner()

    first = runner.invoke(main, ["keys", "generate", "--out", str(tmp_path)])
    again = runner.invoke(main, ["keys", "generate", "--out", str(tmp_path)])

    assert first.exit_code == 0, first.output
    priv, pub = tmp_path / "fleet.key", tmp_path / "fleet.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert again.exit_code == 1
    assert "error:" in again.output and "--force" in again.output
