"""CLI: ``edgepack distill`` — train a small student from a Keras teacher, write ``.keras``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["distill_cmd", "register"]


class StudentType(click.ParamType):
    """A built-in student (``small``, ``tiny``) or a ``.keras``/``.h5`` file holding one."""

    name = "student"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from edgepack.host.build.distill import STUDENTS

        if value in STUDENTS:
            return value
        p = Path(str(value))
        if p.suffix.lower() in (".keras", ".h5") and p.is_file():
            return str(p)
        self.fail(f"{value!r} is neither a built-in student ({', '.join(STUDENTS)}) nor an "
                  "existing .keras/.h5 model file", param, ctx)


def _out_path(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.endswith(".keras"):
        raise click.BadParameter(f"{value!r} must end in .keras (the format edgepack build "
                                 "imports)", ctx, param)
    return value


def _render(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f} ms"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.1f}x" if a and b else "—"

    t = Table(title=f"distilled → {d['out']}")
    t.add_column("")
    t.add_column("teacher", justify="right")
    t.add_column("student", justify="right")
    t.add_column("teacher / student", justify="right")
    t.add_row("accuracy", f"{100 * d['teacher_acc']:.2f}%", f"{100 * d['student_acc']:.2f}%",
              f"{-d['drop_points']:+.2f} pt")
    if d.get("hard_label_acc") is not None:
        t.add_row("student, labels only", "", f"{100 * d['hard_label_acc']:.2f}%",
                  f"{100 * (d['hard_label_acc'] - d['teacher_acc']):+.2f} pt")
    t.add_row("parameters", f"{d['teacher_params']:,}", f"{d['student_params']:,}",
              f"{d['size_ratio']:.1f}x")
    t.add_row("weights (fp32)", f"{d['teacher_bytes']:,} B", f"{d['student_bytes']:,} B",
              ratio(d["teacher_bytes"], d["student_bytes"]))
    t.add_row("host latency p50", ms(d["teacher_latency_ms"]), ms(d["student_latency_ms"]),
              ratio(d["teacher_latency_ms"], d["student_latency_ms"]))
    c = Console()
    c.print(t)
    c.print(f"accuracy on {d['eval_samples']} samples ({d['eval_source']}); latency: "
            f"{d['latency_method']}")
    for n in d["notes"]:
        c.print(f"note: {n}")
    c.print(f"next: edgepack build {d['out']} --target TARGET --calibration calib.npz")


@click.command("distill")
@click.argument("teacher", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="NPZ training data: 'x' and 'y', or the input name and 'labels'.")
@click.option("--val", type=click.Path(exists=True, dir_okay=False),
              help="NPZ validation data (default: 15% of --data held out).")
@click.option("--student", type=StudentType(), default="small", show_default=True,
              help="small | tiny | an untrained .keras student.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=4.0,
              show_default=True, help="Softens both softmaxes.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Weight of the hard-label loss (1 - alpha on the teacher's soft targets).")
@click.option("--epochs", type=click.IntRange(1), default=50, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=3e-3,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--baseline", is_flag=True,
              help="Also train the student on labels alone, to show what the teacher added.")
@click.option("--out", default="student.keras", show_default=True, callback=_out_path,
              type=click.Path(dir_okay=False), help="Where to write the student (.keras).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def distill_cmd(teacher: str, data: str, val: str | None, student: str, temperature: float,
                alpha: float, epochs: int, batch_size: int, learning_rate: float, seed: int,
                baseline: bool, out: str, as_json: bool, quiet: bool) -> None:
    """Train a smaller Keras student from TEACHER (.keras/.h5) on its soft targets."""
    from edgepack.host.build.distill import distill, load_teacher, load_training_npz
    from edgepack.host.build.report import Progress
    from edgepack.host.cli.main import emit

    with Progress(enabled=not (quiet or as_json)) as progress:
        with progress.stage("loading"):
            t_model = load_teacher(teacher)
            x, y = load_training_npz(data, t_model, field="data")
            x_val = y_val = None
            if val:
                x_val, y_val = load_training_npz(val, t_model, field="val")
            s_model = student if student in ("small", "tiny") else \
                load_teacher(student, what="student")
        with progress.stage("distilling" + (" (+ labels-only baseline)" if baseline else ""),
                            total=epochs) as tick:
            result = distill(t_model, x, y, student=s_model, temperature=temperature,
                             alpha=alpha, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, x_val=x_val, y_val=y_val, seed=seed,
                             hard_label_baseline=baseline, on_epoch=lambda done, total: tick(1))
        with progress.stage("saving"):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            result.student_model.save(out)
    emit({**result.to_dict(), "out": out, "teacher": teacher}, as_json, _render)


def register(main: click.Group) -> None:
    """Add ``distill`` to the ``edgepack`` group."""
    main.add_command(distill_cmd)
