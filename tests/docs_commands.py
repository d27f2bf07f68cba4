"""Every command the docs show, and which test runs it exactly as written.

:func:`documented_commands` reads the fenced code blocks of README.md and docs/*.md (not the
``python`` ones), joins ``\\`` continuations, drops trailing ``# comments`` and keeps each line
that starts with ``edgepack``, ``edgepack-agent`` or ``make``. :data:`REGISTRY` says, for each,
how it is covered:

* :class:`Scenario` — ``tests/test_docs_commands.py`` runs it, read from the doc itself, in a
  temporary directory with ``.venv/bin`` on ``PATH`` (``background``: a server, started and left
  running while the lines after it run);
* :class:`RunBy` — another test runs it: its source holds the command string verbatim;
* :class:`ReadFrom` — another test reads the commands from a doc page and runs them as written
  there (the same lines may be shown in the README too);
* :class:`Failing` — fails as written today; ``test_docs_commands`` runs it as a strict xfail
  naming the issue, so it flips to a failure (to be re-registered) once fixed;
* :class:`Excluded` — not run, and why.

``tests/test_docs_commands.py::test_every_documented_command_is_run`` fails on a documented
command without an entry, an entry no doc shows, or a :class:`RunBy` whose test lacks the string.
A helper who adds a command to the docs registers it here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "REGISTRY", "Excluded", "Failing", "ReadFrom", "RunBy", "Scenario",
           "documented_commands", "normalize"]

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_COMMAND = re.compile(r"^(edgepack|edgepack-agent|make)(\s|$)")


@dataclass(frozen=True)
class Scenario:
    """Run from the doc's text by a scenario test of test_docs_commands.py."""

    test: str
    background: bool = False


@dataclass(frozen=True)
class RunBy:
    """Run verbatim by ``test`` (``path::name``), whose source holds the command."""

    test: str


@dataclass(frozen=True)
class ReadFrom:
    """Run by ``test`` (``path::name``), which reads the commands from ``doc`` itself (a doc
    path from the repository root) and runs them as written there."""

    test: str
    doc: str


@dataclass(frozen=True)
class Failing:
    """Fails as written today (strict xfail); ``issue`` names why and where it is tracked."""

    issue: str


@dataclass(frozen=True)
class Excluded:
    why: str


def normalize(line: str) -> str:
    """One command line: a trailing ``# comment`` dropped, whitespace collapsed."""
    line = re.sub(r"\s#(?:\s.*|)$", "", line.strip())
    return " ".join(line.split())


def documented_commands(path: Path) -> list[str]:
    """The command lines of ``path``'s fenced code blocks, in order, as :func:`normalize` has
    them."""
    out = []
    for m in _FENCE.finditer(path.read_text(encoding="utf-8")):
        if m.group(1) not in ("", "sh", "bash", "shell", "console"):
            continue
        body = re.sub(r"\\\n[ \t]*", " ", m.group(2))
        for raw in body.splitlines():
            line = normalize(raw.lstrip().removeprefix("$ "))
            if _COMMAND.match(line):
                out.append(line)
    return out


README_SCENARIO = "tests/test_docs_commands.py::test_readme_using_it"
README_TF = "tests/test_docs_commands.py::test_readme_tensorflow_builds"
_ROLLOUT_SYNOPSIS = ("a synopsis of options in brackets, not a command line; the rollout "
                     "commands run as written in README's 'Using it' block")

REGISTRY: dict[tuple[str, str], Scenario | RunBy | Failing | Excluded] = {
    # -- README.md: Quick start / Development ---------------------------------------------------
    ("README.md", "make demo"): RunBy("tests/test_docs_commands.py::test_make_demo"),
    ("README.md", "make test"): Excluded("the whole suite: this test is part of it"),
    ("README.md", "make lint"): RunBy("tests/test_docs_commands.py::test_make_lint"),
    ("README.md", "make bench"): Excluded("benchmarks take minutes and never run as assertions "
                                          "in the test suite (bench/)"),
    # -- README.md: Using it -------------------------------------------------------------------
    ("README.md", "edgepack targets list"): Scenario(README_SCENARIO),
    ("README.md", "edgepack targets show x86-64-vnni --json"): Scenario(README_SCENARIO),
    ("README.md", "edgepack keys generate --out keys/"): Scenario(README_SCENARIO),
    ("README.md", "edgepack keys init --out fleet-keys/ --root-keys 3 --root-threshold 2"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack build model.onnx --target rpi4 --calibration calib.npz --eval "
                  "eval.npz --key keys/fleet.key --out dist/"): Scenario(README_SCENARIO),
    ("README.md", "edgepack build model.keras --target coral-edgetpu --calibration calib.npz "
                  "--eval eval.npz"): Scenario(README_TF),
    ("README.md", "edgepack build saved_model_dir/ --target android-arm64 --quantize fp16"):
        Scenario(README_TF),
    ("README.md", "edgepack build model.keras --target esp32-s3 --calibration calib.npz"):
        Scenario(README_TF),
    ("README.md", "edgepack build clf.joblib --target rpi4 --sample-input sample.npz"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack build risk.pmml --target rpi4 --sample-input rows.csv"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack build model.keras --target rpi4 --prune 0.5 --train train.npz "
                  "--calibration calib.npz --name model-pruned"): Scenario(README_TF),
    ("README.md", "edgepack distill teacher.keras --data train.npz --student small --out "
                  "student.keras"): Scenario(README_TF),
    ("README.md", "edgepack inspect dist/model-1.0.0-rpi4.edgepack"): Scenario(README_SCENARIO),
    ("README.md", "edgepack inspect dist/model-1.0.0-rpi4.edgepack --json"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack verify dist/model-1.0.0-rpi4.edgepack --pub keys/fleet.pub"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack broker --port 1883"): Scenario(README_SCENARIO, background=True),
    ("README.md", "edgepack agent init --board rpi4 --device-id pi-kitchen --group rpi4-fleet "
                  "--broker $BROKER --pub keys/fleet.pub --data-dir device/ --out "
                  "device/agent.toml"): Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet enroll device/enrollment.json --db sqlite:///fleet.db"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack-agent --config device/agent.toml"):
        Scenario(README_SCENARIO, background=True),
    ("README.md", "edgepack publish dist/model-1.0.0-rpi4.edgepack --broker $BROKER --key "
                  "keys/fleet.key"): Scenario(README_SCENARIO),
    ("README.md", "edgepack deploy dist/model-1.0.0-rpi4.edgepack --device pi-kitchen --broker "
                  "$BROKER --key keys/fleet.key --wait 120"): Scenario(README_SCENARIO),
    ("README.md", "edgepack deploy dist/model-1.0.0-rpi4.edgepack --group rpi4-fleet --broker "
                  "$BROKER"): Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet status --broker $BROKER"): Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet status --broker $BROKER --json"): Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet serve --broker $BROKER --db sqlite:///fleet.db --http "
                  "127.0.0.1:8080"): Scenario(README_SCENARIO, background=True),
    ("README.md", "edgepack fleet serve --broker mqtts://emqx:8883 --db "
                  "postgresql://fleet@db/fleet"):
        Excluded("names a remote TLS broker and database server as an example of a bigger "
                 "fleet; fleet serve on PostgreSQL runs in tests/host/fleet/server"),
    ("README.md", "edgepack build model.onnx --target rpi4 --calibration calib.npz --eval "
                  "eval.npz --key keys/fleet.key --version 2.0.0"): Scenario(README_SCENARIO),
    ("README.md", "edgepack deploy dist/model-2.0.0-rpi4.edgepack --group rpi4-fleet --stages "
                  "1,10,50,100 --max-failures 5% --soak 10m --broker $BROKER --key keys/fleet.key"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack rollout list"): Scenario(README_SCENARIO),
    ("README.md", "edgepack rollout status ro-"): Scenario(README_SCENARIO),
    ("README.md", "edgepack rollout pause ro-"): Scenario(README_SCENARIO),
    ("README.md", "edgepack rollout resume ro-"): Scenario(README_SCENARIO),
    ("README.md", "edgepack rollout abort ro-"): Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet clear --device pi-kitchen --broker $BROKER"):
        Scenario(README_SCENARIO),
    ("README.md", "edgepack fleet simulate --devices 50 --broker $BROKER --target rpi4 "
                  "--fail-rate 0.1 --duration 5"): Scenario(README_SCENARIO),
    ("README.md", "edgepack profile dist/model-1.0.0-rpi4.edgepack --device pi-kitchen --broker "
                  "$BROKER --key keys/fleet.key"): Scenario(README_SCENARIO),
    ("README.md", "edgepack build model.onnx --target rpi4 --calibration calib.npz --eval "
                  "eval.npz --profile-on pi-kitchen --broker $BROKER --key keys/fleet.key"):
        Scenario(README_SCENARIO),
    # -- README.md: TFLite, device identity, key rotation, group override ----------------------
    ("README.md", "edgepack build model.tflite --target esp32-s3"): RunBy("tests/host/build/corpus/test_corpus_tflite_build.py::test_readme_tflite_commands"),
    ("README.md", "edgepack build model.tflite --target rpi4"): RunBy("tests/host/build/corpus/test_corpus_tflite_build.py::test_readme_tflite_commands"),
    ("README.md", "edgepack agent init --board rpi4 --device-id pi-kitchen --broker "
                  "mqtt://localhost:1883 --pub keys/fleet.pub --data-dir var --out etc/agent.toml "
                  "--group kitchen"): RunBy("tests/host/fleet/trust/test_fleet_inventory.py::test_agent_init_enroll_devices_revoke"),
    ("README.md", "edgepack fleet enroll etc/enrollment.json --group kitchen --db "
                  "sqlite:///fleet.db"): RunBy("tests/host/fleet/trust/test_fleet_inventory.py::test_agent_init_enroll_devices_revoke"),
    ("README.md", "edgepack fleet devices --db sqlite:///fleet.db --json"): RunBy("tests/host/fleet/trust/test_fleet_inventory.py::test_agent_init_enroll_devices_revoke"),
    ("README.md", "edgepack fleet revoke --device pi-hall --db sqlite:///fleet.db"):
        RunBy("tests/host/fleet/trust/test_fleet_inventory.py::test_agent_init_enroll_devices_revoke"),
    ("README.md", "edgepack deploy tiny.edgepack --group lab"): RunBy("tests/host/fleet/deploy/test_deploy_group_override.py::test_group_deploy_names_devices_that_override_it"),
    ("README.md", "edgepack fleet clear --device dev-a"): RunBy("tests/host/fleet/deploy/test_deploy_group_override.py::test_group_deploy_names_devices_that_override_it"),
    ("README.md", "edgepack keys init --root-keys 3 --root-threshold 2"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("README.md", "edgepack keys rotate --role release --publish"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("README.md", "edgepack keys show"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("README.md", "edgepack keys rotate --role root --count 3 --threshold 2 --root-key keys/root-1.key --root-key keys/root-3.key --publish"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("README.md", "edgepack keys publish-root"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("docs/security.md", "edgepack keys init --root-keys 3 --root-threshold 2"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("docs/security.md", "edgepack keys rotate --role release --publish"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("docs/security.md", "edgepack keys show"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    ("docs/security.md", "edgepack keys rotate --role root --count 3 --threshold 2 --root-key keys/root-1.key --root-key keys/root-3.key --publish"):
        RunBy("tests/agent/trust/test_trust_rotation.py::test_rotate_release_then_root_on_a_live_device"),
    # -- rollouts and capture: the tests read docs/rollouts.md and docs/drift.md ----------
    ("README.md", "edgepack rollout start slow.edgepack --id ro-slow --group cams --stages 50,100 --soak 30s --max-failures 0 --max-latency-regression 20% --max-error-rate-rise 1pt --max-confidence-drop 5pt --key fleet.key"):
        ReadFrom("tests/host/fleet/server/test_fleet_rollout_halts.py::test_a_slower_bundle_halts_its_first_stage_a_same_speed_one_passes", "docs/rollouts.md"),
    ("README.md", "edgepack rollout status ro-slow"):
        ReadFrom("tests/host/fleet/server/test_fleet_rollout_halts.py::test_a_slower_bundle_halts_its_first_stage_a_same_speed_one_passes", "docs/rollouts.md"),
    ("docs/rollouts.md", "edgepack rollout start slow.edgepack --id ro-slow --group cams --stages 50,100 --soak 30s --max-failures 0 --max-latency-regression 20% --max-error-rate-rise 1pt --max-confidence-drop 5pt --key fleet.key"):
        ReadFrom("tests/host/fleet/server/test_fleet_rollout_halts.py::test_a_slower_bundle_halts_its_first_stage_a_same_speed_one_passes", "docs/rollouts.md"),
    ("docs/rollouts.md", "edgepack rollout status ro-slow"):
        ReadFrom("tests/host/fleet/server/test_fleet_rollout_halts.py::test_a_slower_bundle_halts_its_first_stage_a_same_speed_one_passes", "docs/rollouts.md"),
    ("README.md", "edgepack capture start --device pi-door --rate 0.01 --max-mb 20 --until 12h"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    ("README.md", "edgepack capture pull --device pi-door --out captured/"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    ("README.md", "edgepack capture stop --device pi-door --purge"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    ("docs/drift.md", "edgepack capture start --device pi-door --rate 0.01 --max-mb 20 --until 12h"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    ("docs/drift.md", "edgepack capture pull --device pi-door --out captured/"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    ("docs/drift.md", "edgepack capture stop --device pi-door --purge"):
        ReadFrom("tests/agent/test_agent_capture.py::test_the_capture_commands_of_the_docs_run_as_written", "docs/drift.md"),
    # -- docs/fleet-api.md ---------------------------------------------------------------------
    ("docs/fleet-api.md", "edgepack fleet serve --broker mqtt://localhost:1883 --db "
                     "sqlite:///fleet.db --http 127.0.0.1:8080"):
        Excluded("the README's fleet serve line with the broker spelled out; README's runs"),
    ("docs/fleet-api.md", "edgepack fleet serve --broker mqtts://emqx:8883 --db "
                     "postgresql://fleet@db/fleet --fleet site-a --fleet site-b"):
        Excluded("names a remote TLS broker and database server; several fleets on one "
                 "server run in tests/host/fleet/server"),
    ("docs/fleet-api.md", "edgepack deploy dist/m-2.0.0-rpi4.edgepack --group rpi4-fleet --stages "
                     "1,10,50,100 --max-failures 5% --soak 10m [--stage-timeout 30m] [--db …] "
                     "[--key fleet.key]"): Excluded(_ROLLOUT_SYNOPSIS),
    ("docs/fleet-api.md", "edgepack rollout start BUNDLE --group G …"): Excluded(_ROLLOUT_SYNOPSIS),
    ("docs/fleet-api.md", "edgepack rollout status ID [--watch] [--json]"):
        Excluded(_ROLLOUT_SYNOPSIS),
    ("docs/fleet-api.md", "edgepack rollout list | pause ID | resume ID | abort ID [--no-rollback]"):
        Excluded(_ROLLOUT_SYNOPSIS),
    ("docs/fleet-api.md", "edgepack fleet simulate --devices 500 --broker mqtt://localhost:1883 "
                     "--target rpi4 [--fail-rate 0.1] [--over-budget-rate 0.05] [--group sim] "
                     "[--interval 5] [--pub fleet.pub]"):
        Excluded("a synopsis of options in brackets; README's simulate line runs as written"),
}
