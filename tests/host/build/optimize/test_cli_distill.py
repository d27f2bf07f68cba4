"""``edgepack distill`` through click's CliRunner, registered on a fresh group."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from optimize_models import Digits, Teacher

from edgepack.agent.errors import ModelError
from edgepack.host.cli.distill import register


@pytest.fixture
def cli() -> click.Group:
    @click.group()
    def main() -> None:
        pass

    register(main)
    return main


def test_distill_writes_a_loadable_keras_student(cli: click.Group, teacher: Teacher,
                                                 digits: Digits, tmp_path: Path) -> None:
    import keras

    out = tmp_path / "models" / "student.keras"
    result = CliRunner().invoke(cli, [
        "distill", str(teacher.keras_path), "--data", str(teacher.train_npz),
        "--val", str(teacher.val_npz), "--student", "small", "--temperature", "4",
        "--alpha", "0.1", "--epochs", "4", "--out", str(out), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["out"] == str(out)
    assert report["size_ratio"] >= 4
    assert report["eval_samples"] == len(digits.x_test)
    assert {"teacher_acc", "student_acc", "teacher_latency_ms", "student_latency_ms",
            "teacher_params", "student_params", "teacher_bytes", "student_bytes"} <= set(report)
    student = keras.models.load_model(out)
    assert student.predict(digits.x_test[:3], verbose=0).shape == (3, 10)
    assert student.count_params() == report["student_params"]


def test_human_output_compares_teacher_and_student(cli: click.Group, teacher: Teacher,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "s.keras"
    result = CliRunner().invoke(cli, [
        "distill", str(teacher.keras_path), "--data", str(teacher.train_npz), "--student",
        "tiny", "--epochs", "1", "--baseline", "--out", str(out), "-q"])

    assert result.exit_code == 0, result.output
    for word in ("accuracy", "labels only", "parameters", "host latency", "held out",
                 "edgepack build"):
        assert word in result.stdout
    assert out.is_file()


def test_flags_are_validated(cli: click.Group, teacher: Teacher, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["distill", str(teacher.keras_path), "--data", str(teacher.train_npz)]

    r = runner.invoke(cli, [*base, "--out", str(tmp_path / "s.h5")])
    assert r.exit_code == 2 and "must end in .keras" in r.output
    r = runner.invoke(cli, [*base, "--student", "huge"])
    assert r.exit_code == 2 and "small, tiny" in r.output
    r = runner.invoke(cli, [*base, "--temperature", "0"])
    assert r.exit_code == 2
    r = runner.invoke(cli, [*base, "--alpha", "2"])
    assert r.exit_code == 2


def test_broken_teacher_is_a_model_error(cli: click.Group, teacher: Teacher,
                                         tmp_path: Path) -> None:
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")

    result = CliRunner().invoke(cli, ["distill", str(bad), "--data", str(teacher.train_npz),
                                      "--out", str(tmp_path / "s.keras")])

    assert isinstance(result.exception, ModelError)
    assert "cannot load the Keras teacher" in str(result.exception)
