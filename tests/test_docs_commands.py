"""Every command in README.md and docs/*.md runs in a test exactly as written.

``test_every_documented_command_is_run`` checks the registry (tests/docs_commands.py) against the
docs. The scenario tests run README's "Using it" block from the README's own text, in order, in a
temporary directory holding the files it names (model.onnx, calib.npz, eval.npz, clf.joblib,
sample.npz, risk.pmml, rows.csv, model.keras, saved_model_dir/, teacher.keras, train.npz), with
``.venv/bin`` on ``PATH``, ``$BROKER`` pointing at a Mosquitto of their own, and servers (the
embedded broker, the agent, the fleet server) started in the background and stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from docs_commands import (
    REGISTRY,
    ROOT,
    Excluded,
    Failing,
    ReadFrom,
    RunBy,
    Scenario,
    documented_commands,
)

BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
sys.path.insert(0, str(ROOT / "tests" / "host" / "build" / "engine"))
sys.path.insert(0, str(ROOT / "tests" / "host" / "build" / "importers"))


def _documented() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), c) for p in DOCS for c in documented_commands(p)]


def _lines_for(test: str) -> list[tuple[str, Scenario]]:
    """README's lines registered to ``test``, in the README's order."""
    return [(c, e) for (doc, c) in _documented() if doc == "README.md"
            for e in [REGISTRY.get((doc, c))] if isinstance(e, Scenario) and e.test == test]


# -- the registry ------------------------------------------------------------------------------

def _holds(source: str, cmd: str) -> bool:
    """The test's source runs ``cmd`` as written: as one string (Python's implicit
    concatenation of adjacent literals allowed), or as its words in one argument list
    (``"fleet", "revoke", "--device", "pi-hall"``)."""
    flat = " ".join(source.split())
    if cmd in flat or cmd in re.sub(r'" "', "", flat):
        return True
    words = shlex.split(cmd)[1:]
    packed = re.sub(r"\s+", "", source)
    return ",".join(f'"{w}"' for w in words) in packed


def test_every_documented_command_is_run() -> None:
    documented = _documented()
    missing = [key for key in documented if key not in REGISTRY]
    stale = [key for key in REGISTRY if key not in documented]
    not_verbatim = []
    for (doc, cmd), entry in REGISTRY.items():
        if isinstance(entry, RunBy):
            path, _, name = entry.test.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            if f"def {name}(" not in source or not _holds(source, cmd):
                not_verbatim.append((doc, cmd, entry.test))
        elif isinstance(entry, ReadFrom):
            path, _, name = entry.test.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            shown = documented_commands(ROOT / entry.doc)
            if f"def {name}(" not in source or entry.doc.split("/")[-1] not in source \
                    or cmd not in shown:
                not_verbatim.append((doc, cmd, entry.test))
        elif isinstance(entry, Scenario):
            path, _, name = entry.test.partition("::")
            assert f"def {name}(" in (ROOT / path).read_text(encoding="utf-8"), entry.test
        else:
            assert isinstance(entry, Excluded | Failing) and (
                getattr(entry, "why", "") or getattr(entry, "issue", ""))

    assert missing == [], "documented commands no test runs: register them in tests/docs_commands.py"
    assert stale == [], "registered commands no doc shows any more"
    assert not_verbatim == [], "these tests do not run the command as written"


def test_the_registry_reads_continuations_and_comments(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("```\nedgepack build m.onnx \\\n    --target rpi4   # a comment\n"
                   "# not a command\nmake lint\n```\n```python\nedgepack = 1\n```\n")

    assert documented_commands(doc) == ["edgepack build m.onnx --target rpi4", "make lint"]


# -- the files README's commands name ----------------------------------------------------------

def _write_inputs(d: Path) -> None:
    """model.onnx (a digits MLP, input (N, 64)), calib/eval/sample/train .npz, clf.joblib,
    risk.pmml + rows.csv."""
    import warnings

    import joblib
    from build_models import digits_flat, make_mlp, train_mlp_weights
    from pmml_files import write_logreg_pmml
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, y_te = digits_flat()
    make_mlp(d / "model.onnx", train_mlp_weights(x_tr, y_tr))
    np.savez(d / "calib.npz", x=x_tr)
    np.savez(d / "eval.npz", x=x_te, labels=y_te)
    np.savez(d / "sample.npz", x=x_te[:40])
    np.savez(d / "train.npz", x=x_tr, y=y_tr)
    joblib.dump(RandomForestClassifier(8, max_depth=6, random_state=0).fit(x_tr, y_tr),
                d / "clf.joblib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(max_iter=300).fit(x_tr, y_tr)
    write_logreg_pmml(d / "risk.pmml", lr.coef_, lr.intercept_, lr.classes_)
    header = ",".join(f"x{i}" for i in range(64))
    np.savetxt(d / "rows.csv", x_te[:40], delimiter=",", header=header, comments="")


def _write_keras(d: Path) -> None:
    """model.keras / teacher.keras (a dense digits classifier on the same (N, 64) input) and its
    SavedModel saved_model_dir/."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from build_models import digits_flat

    x_tr, _, y_tr, _ = digits_flat()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,), name="x"), keras.layers.Dense(32, "relu"),
                              keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_tr, y_tr, epochs=20, batch_size=64, verbose=0)
    model.save(d / "model.keras")
    model.save(d / "teacher.keras")
    model.export(str(d / "saved_model_dir"), format="tf_saved_model", verbose=False)


# -- running lines as a user types them --------------------------------------------------------

def _env(home: Path, broker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", BROKER=broker, HOME=str(home))
    return env


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ready(line: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait until a server line answers (or give it a moment: the agent has no port)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{line!r} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if line.startswith("edgepack broker") and _port_open(1883):
            return
        if line.startswith("edgepack fleet serve"):
            with contextlib.suppress(OSError):
                urllib.request.urlopen("http://127.0.0.1:8080/", timeout=2).close()
                return
        if line.startswith("edgepack-agent") and time.monotonic() > deadline - 57:
            return
        time.sleep(0.3)
    raise AssertionError(f"{line!r} did not come up:\n{log.read_text()[-3000:]}")


def _run_in_order(lines: list[tuple[str, Scenario]], cwd: Path, env: dict[str, str]) -> None:
    servers: list[subprocess.Popen] = []
    failures: list[str] = []
    try:
        for i, (line, entry) in enumerate(lines):
            if entry.background:
                log = cwd / f"server-{i}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(line, shell=True, cwd=cwd, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                servers.append(proc)
                _ready(line, proc, log)
                continue
            run = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True,
                                 text=True, timeout=300, check=False)
            with open(cwd / "session.log", "a") as session:
                session.write(f"$ {line}\n{run.stdout}{run.stderr}exit {run.returncode}\n")
            if run.returncode != 0:
                failures.append(f"$ {line}\nexit {run.returncode}\n{run.stdout[-1500:]}"
                                f"{run.stderr[-2000:]}")
    finally:
        for proc in reversed(servers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert failures == [], "\n\n".join(failures)


@pytest.fixture(scope="module")
def broker() -> str:
    from brokers import start_mosquitto

    b = start_mosquitto()  # of its own: README's lines use the default fleet name
    yield b.url
    b.stop()


def test_readme_using_it(tmp_path: Path, broker: str) -> None:
    lines = _lines_for("tests/test_docs_commands.py::test_readme_using_it")
    _write_inputs(tmp_path)

    _run_in_order(lines, tmp_path, _env(tmp_path, broker))

    assert (tmp_path / "dist" / "model-1.0.0-rpi4.edgepack").exists()
    assert (tmp_path / "dist" / "model-2.0.0-rpi4.edgepack").exists()
    assert (tmp_path / "device" / "agent.toml").exists()


def test_readme_tensorflow_builds(tmp_path: Path, broker: str) -> None:
    lines = _lines_for("tests/test_docs_commands.py::test_readme_tensorflow_builds")
    _write_inputs(tmp_path)
    _write_keras(tmp_path)

    _run_in_order(lines, tmp_path, _env(tmp_path, broker))

    built = sorted(p.name for p in (tmp_path / "dist").glob("*.edgepack"))
    assert built == ["model-1.0.0-coral-edgetpu.edgepack", "model-1.0.0-esp32-s3.edgepack",
                     "model-pruned-1.0.0-rpi4.edgepack",
                     "saved_model_dir-1.0.0-android-arm64.edgepack"]
    assert (tmp_path / "student.keras").exists()


@pytest.mark.parametrize("doc,command", [k for k, e in REGISTRY.items()
                                         if isinstance(e, Failing)])
def test_documented_commands_known_to_fail(tmp_path: Path, broker: str, request: pytest.FixtureRequest,
                                           doc: str, command: str) -> None:
    request.applymarker(pytest.mark.xfail(reason=REGISTRY[doc, command].issue, strict=True))
    _write_inputs(tmp_path)

    _run_in_order([(command, Scenario("known to fail"))], tmp_path, _env(tmp_path, broker))


# -- make --------------------------------------------------------------------------------------

def _make(line: str) -> subprocess.CompletedProcess:
    stamp = ROOT / ".venv" / ".edgepack-installed"
    if (ROOT / ".venv").is_dir() and not stamp.exists():
        stamp.touch()  # this venv is installed already: make must not reinstall it
    return subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def test_make_lint() -> None:
    run = _make("make lint")
    assert run.returncode == 0, run.stdout + run.stderr


def test_make_demo() -> None:
    run = _make("make demo")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
