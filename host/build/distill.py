"""Knowledge distillation: train a small Keras student on a teacher's softened outputs.

The student learns from ``alpha`` × cross-entropy with the true labels plus ``(1 − alpha)`` ×
T² × KL(teacher ‖ student) on softmax(logits / T) (Hinton et al., 2015; the T² keeps the soft
term's gradients on the hard term's scale). There is no data augmentation, so the teacher's
logits are computed once up front and packed next to the labels; a small ``keras.Model``
subclass supplies the loss.

Students are derived from the teacher's input shape and class count (``"small"``, ``"tiny"``),
or passed in as a Keras model. Accuracy, size and host latency of both are measured the same
way: latency through onnxruntime (both models converted in-process with tf2onnx, one thread,
batch 1), falling back to timing a compiled ``tf.function`` when conversion fails.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.errors import DataError, ModelError

__all__ = ["DistillResult", "distill", "build_student", "load_teacher", "load_training_npz",
           "STUDENTS"]

STUDENTS = ("small", "tiny")
HOLDOUT_FRACTION = 0.15
# Students pool the image down to at most this many positions before the classifier.
_MAX_POSITIONS = 16


@dataclass(frozen=True)
class DistillResult:
    """The trained student and how it compares with the teacher on the same eval samples."""

    student_model: Any = field(repr=False)
    teacher_acc: float
    student_acc: float
    teacher_params: int
    student_params: int
    size_ratio: float  # teacher params / student params
    teacher_latency_ms: float | None
    student_latency_ms: float | None
    teacher_bytes: int = 0  # float32 weights
    student_bytes: int = 0
    latency_method: str = ""
    eval_source: str = ""
    eval_samples: int = 0
    epochs: int = 0
    hard_label_acc: float | None = None  # same student trained on labels only, if asked
    notes: tuple[str, ...] = ()

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.teacher_acc - self.student_acc)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k != "student_model"} | {"drop_points": self.drop_points}


def load_teacher(path: str | os.PathLike, *, what: str = "teacher") -> Any:
    """A Keras model from a ``.keras`` or ``.h5`` file (not compiled)."""
    import keras

    path = Path(path)
    if path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{path} is not a Keras model file: distill takes a .keras or .h5 "
                         f"{what} (save yours with model.save('teacher.keras'))", stage="distill")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ModelError(f"cannot load the Keras {what} {path}: {str(exc)[:300]}",
                         stage="distill") from None


def _input_spec(model: Any) -> tuple[str, tuple[int, ...]]:
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        raise ModelError("distill supports single-input Keras models (functional or Sequential "
                         "with a known input shape)", stage="distill")
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ModelError(f"the teacher's input shape {shape} has unknown dimensions; give it a "
                         "fixed input shape (keras.Input((H, W, C)))", stage="distill")
    name = str(getattr(inputs[0], "name", "") or "input").split(":")[0]
    return name, shape


def _classes(model: Any) -> int:
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or len(outputs[0].shape) != 2 \
            or (outputs[0].shape[-1] or 0) < 2:
        raise ModelError("distill needs a classifier teacher: one output of shape (batch, "
                         "classes) with 2 or more classes", stage="distill")
    return int(outputs[0].shape[-1])


def load_training_npz(path: str | os.PathLike, teacher: Any, *, field: str = "data"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and integer labels from an ``.npz``: ``x``/``y``, or input-named + ``labels``."""
    path = Path(path)
    flag = f"`{field}=`"
    name, shape = _input_spec(teacher)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{flag} {path} is not a readable .npz file ({exc})", field=field) from None
    y = arrays.pop("y", None)
    if y is None:
        y = arrays.pop("labels", None)
    if y is None:
        raise DataError(f"{flag} {path} has no labels: save them as 'y' (with 'x') or "
                        f"'labels' (with the input array, '{name}')", field=field)
    if "x" in arrays:
        x = arrays["x"]
    elif name in arrays:
        x = arrays[name]
    elif len(arrays) == 1:
        x = next(iter(arrays.values()))
    else:
        raise DataError(f"{flag} {path} holds {', '.join(sorted(arrays)) or 'no inputs'}; key the "
                        f"inputs 'x' or '{name}'", field=field)
    return _check_xy(x, y, shape, flag, field)


def _check_xy(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], what: str, field: str
              ) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if tuple(x.shape[1:]) != shape:
        raise DataError(f"{what} inputs have shape {x.shape}, the teacher takes (N, "
                        f"{', '.join(map(str, shape))})", field=field)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)  # one-hot
    y = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{what}: {len(x)} inputs vs {len(y)} labels; give the same non-zero "
                        "number of each", field=field)
    if y.dtype.kind == "f":
        if not np.all(y == np.round(y)):
            raise DataError(f"{what} labels are not class ids (integers)", field=field)
        y = y.astype(np.int64)
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    return x.astype(np.float32, copy=False), y.astype(np.int64)


def build_student(kind: str, input_shape: tuple[int, ...], classes: int, *,
                  input_name: str = "input") -> Any:
    """An untrained student for ``input_shape`` and ``classes``; outputs logits.

    Images (H, W, C): ``"small"`` is two 3×3 convs (8 and 16 filters), ``"tiny"`` one (8
    filters); both max-pool down to ≤ 16 positions, then one Dense. Feature vectors (F,):
    ``"small"`` is Dense 32 → 16, ``"tiny"`` Dense 16, then the classifier.
    """
    import keras
    from keras import layers

    if kind not in STUDENTS:
        raise ModelError(f"unknown student {kind!r}: use one of {', '.join(STUDENTS)} or pass a "
                         "Keras model", stage="distill")
    inp = keras.Input(input_shape, name=input_name)
    h = inp
    if len(input_shape) == 3:
        for width in (8, 16) if kind == "small" else (8,):
            h = layers.Conv2D(width, 3, padding="same", activation="relu")(h)
        rows, cols = input_shape[:2]
        while True:
            h = layers.MaxPooling2D(2, padding="same")(h)
            rows, cols = -(-rows // 2), -(-cols // 2)
            if rows * cols <= _MAX_POSITIONS or rows == cols == 1:
                break
        h = layers.Flatten()(h)
    elif len(input_shape) == 1:
        for width in (32, 16) if kind == "small" else (16,):
            h = layers.Dense(width, activation="relu")(h)
    else:
        raise ModelError(f"no built-in student for inputs shaped {input_shape}: pass a Keras "
                         "model as the student", stage="distill")
    out = layers.Dense(classes, name="logits")(h)
    return keras.Model(inp, out, name=f"student_{kind}")


def _ends_in_softmax(model: Any) -> bool:
    last = model.layers[-1] if model.layers else None
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax" or type(last).__name__ == "Softmax"


def _teacher_logits(teacher: Any, x: np.ndarray) -> np.ndarray:
    out = np.asarray(teacher.predict(x, batch_size=256, verbose=0), dtype=np.float64)
    # A teacher ending in softmax gives probabilities: log p are logits up to a constant,
    # which softmax(· / T) ignores.
    if (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        out = np.log(np.clip(out, 1e-12, 1.0))
    return out.astype(np.float32)


def _distiller(student: Any, temperature: float, alpha: float, student_probs: bool) -> Any:
    import keras
    from keras import ops

    class Distiller(keras.Model):
        """Trains ``student``; ``y`` packs the label in column 0 and the teacher's logits after."""

        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def call(self, x: Any, training: bool = False) -> Any:
            return self.student(x, training=training)

        def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None,
                         sample_weight: Any = None, training: bool = True) -> Any:
            labels = ops.cast(y[:, 0], "int32")
            t_logits = y[:, 1:]
            s_logits = ops.log(ops.clip(y_pred, 1e-7, 1.0)) if student_probs else y_pred
            hard = ops.mean(keras.losses.sparse_categorical_crossentropy(
                labels, s_logits, from_logits=True))
            t = temperature
            p_teacher = ops.softmax(t_logits / t, axis=-1)
            kl = ops.sum(p_teacher * (ops.log(ops.clip(p_teacher, 1e-12, 1.0))
                                      - ops.log_softmax(s_logits / t, axis=-1)), axis=-1)
            return alpha * hard + (1.0 - alpha) * t * t * ops.mean(kl)

    return Distiller()


def _train(student: Any, x: np.ndarray, packed: np.ndarray, temperature: float, alpha: float,
           *, epochs: int, batch_size: int, learning_rate: float,
           on_epoch: Callable[[int, int], None] | None) -> None:
    """Fit ``student`` in place, then compile it plainly (sparse CE + accuracy) for saving."""
    import keras

    probs = _ends_in_softmax(student)
    trainer = _distiller(student, temperature, alpha, probs)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    callbacks = [_epoch_callback(on_epoch, epochs)] if on_epoch else []
    trainer.fit(x, packed, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                callbacks=callbacks)
    student.compile(optimizer=keras.optimizers.Adam(learning_rate),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probs),
                    metrics=["accuracy"])
    # A built optimizer saves and loads cleanly (an unbuilt one warns on load_model).
    student.optimizer.build(student.trainable_variables)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    pred = np.asarray(model.predict(x, batch_size=256, verbose=0))
    return float((pred.argmax(axis=1) == y).mean())


def _weight_bytes(model: Any) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights) * 4)


def _latency_onnx(model: Any, sample: np.ndarray) -> float:
    import tensorflow as tf
    import tf2onnx

    from edgepack.host.build.validate import Session, measure_latency

    spec = (tf.TensorSpec((None, *sample.shape[1:]), tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    sess = Session(proto.SerializeToString(), threads=1)
    name = sess.sess.get_inputs()[0].name
    return measure_latency(sess, {name: sample}, budget_s=0.5)["p50_ms"]


def _latency_tf(model: Any, sample: np.ndarray) -> float:
    import time

    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    x = tf.constant(sample)
    for _ in range(10):
        fn(x)
    times = []
    start = time.perf_counter()
    while len(times) < 50 or time.perf_counter() - start < 0.5:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 2000:
            break
    return float(np.percentile(times, 50))


def _latencies(teacher: Any, student: Any, sample: np.ndarray
               ) -> tuple[float | None, float | None, str]:
    try:
        with _quiet_tf():
            return (_latency_onnx(teacher, sample), _latency_onnx(student, sample),
                    "onnxruntime CPU, 1 thread, batch 1, p50 (tf2onnx in-process)")
    except Exception as exc:  # conversion is best effort; the fallback still compares fairly
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return (_latency_tf(teacher, sample), _latency_tf(student, sample),
                f"TensorFlow tf.function, batch 1, p50 (ONNX conversion failed: {reason})")


class _quiet_tf:
    """Silence tf2onnx's INFO logging while it converts."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("tf2onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _epoch_callback(on_epoch: Callable[[int, int], None], epochs: int) -> Any:
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            on_epoch(epoch + 1, epochs)

    return EpochProgress()


def distill(teacher: Any, x_train: np.ndarray, y_train: np.ndarray, *,
            student: str | Any = "small", temperature: float = 4.0, alpha: float = 0.1,
            epochs: int = 50, batch_size: int = 32, learning_rate: float = 3e-3,
            x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, seed: int = 0,
            measure_latency: bool = True, hard_label_baseline: bool = False,
            on_epoch: Callable[[int, int], None] | None = None) -> DistillResult:
    """Train a student classifier from ``teacher`` (a Keras model) on its softened logits.

    ``student`` is ``"small"``/``"tiny"`` (see :func:`build_student`) or a Keras model with the
    teacher's input and output shapes (trained in place). Labels are class ids (or one-hot).
    Without ``x_val``/``y_val``, 15% of the training data is held out for the comparison (the
    teacher may have seen those samples, which flatters it: the comparison is conservative).
    The returned student outputs logits and is compiled with sparse cross-entropy and accuracy,
    ready to ``save("student.keras")`` for ``edgepack build``. ``on_epoch(done, total)`` reports
    progress. ``hard_label_baseline`` also trains the same architecture on the labels alone
    (``hard_label_acc``), to show whether the teacher's soft targets helped — on easy data
    (digits) they often do not.
    """
    import keras

    if not temperature > 0:
        raise ModelError(f"temperature must be > 0 (got {temperature})", stage="distill")
    if not 0.0 <= alpha <= 1.0:
        raise ModelError(f"alpha weighs the hard-label loss and must be in [0, 1] (got {alpha})",
                         stage="distill")
    if epochs < 1:
        raise ModelError(f"epochs must be at least 1 (got {epochs})", stage="distill")
    input_name, shape = _input_spec(teacher)
    classes = _classes(teacher)
    x_train, y_train = _check_xy(x_train, y_train, shape, "training data", "x_train")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras.utils.set_random_seed(seed)
    notes = []
    if (x_val is None) != (y_val is None):
        raise DataError("give both x_val and y_val, or neither", stage="distill")
    if x_val is not None:
        x_val, y_val = _check_xy(x_val, y_val, shape, "validation data", "x_val")
        eval_source = "validation data"
    else:
        if len(x_train) < 10:
            raise DataError(f"only {len(x_train)} training samples: give at least 10, or "
                            "separate validation data", stage="distill")
        order = np.random.default_rng(seed).permutation(len(x_train))
        n_val = max(1, int(round(len(x_train) * HOLDOUT_FRACTION)))
        x_val, y_val = x_train[order[:n_val]], y_train[order[:n_val]]
        x_train, y_train = x_train[order[n_val:]], y_train[order[n_val:]]
        eval_source = f"{n_val} samples held out of the training data"
        notes.append("no validation data: accuracy on a 15% hold-out the teacher may have been "
                     "trained on (flatters the teacher)")
    if y_train.max() >= classes or y_train.min() < 0:
        raise DataError(f"labels run {y_train.min()}..{y_train.max()} but the teacher has "
                        f"{classes} classes", stage="distill")

    if isinstance(student, str):
        student_model = build_student(student, shape, classes, input_name=input_name)
        kind = student
    else:
        student_model = student
        kind = getattr(student, "name", "custom")
        if _input_spec(student_model)[1] != shape or _classes(student_model) != classes:
            raise ModelError("the student must take the teacher's input shape and give its "
                             f"number of classes ({shape} → {classes})", stage="distill")

    packed = np.concatenate([y_train[:, None].astype(np.float32),
                             _teacher_logits(teacher, x_train)], axis=1)
    fresh = None
    if hard_label_baseline:
        try:
            fresh = keras.models.clone_model(student_model)
        except Exception:  # subclassed students cannot be cloned
            notes.append("labels-only baseline skipped: the student model cannot be cloned")
    fit = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
    _train(student_model, x_train, packed, float(temperature), float(alpha),
           on_epoch=on_epoch, **fit)
    hard_acc = None
    if fresh is not None:
        # Same architecture, same budget, labels only (alpha = 1): did the teacher help?
        keras.utils.set_random_seed(seed)
        _train(fresh, x_train, packed, 1.0, 1.0, on_epoch=None, **fit)
        hard_acc = _accuracy(fresh, x_val, y_val)

    student_acc = _accuracy(student_model, x_val, y_val)
    t_params, s_params = int(teacher.count_params()), int(student_model.count_params())
    t_lat = s_lat = None
    method = "not measured"
    if measure_latency:
        t_lat, s_lat, method = _latencies(teacher, student_model, x_val[:1])
    notes.append(f"student {kind!r}: T={temperature:g}, alpha={alpha:g} (hard-label weight), "
                 f"{epochs} epochs on {len(x_train)} samples")
    if hard_acc is not None:
        gain = 100.0 * (student_acc - hard_acc)
        effect = ("made no difference" if abs(gain) < 0.005 else
                  f"{'gained' if gain > 0 else 'cost'} {abs(gain):.2f} points")
        notes.append(f"the same student trained on labels alone reaches {100 * hard_acc:.2f}%: "
                     f"distillation {effect}" + ("" if gain >= 0.005 else
                                                 " (the labels suffice for this student on this "
                                                 "data; try a lower temperature or a smaller "
                                                 "student)"))
    if s_params * 4 > t_params:
        notes.append(f"the student is only {t_params / s_params:.1f}x smaller than the teacher")
    return DistillResult(
        student_model=student_model, teacher_acc=_accuracy(teacher, x_val, y_val),
        student_acc=student_acc,
        teacher_params=t_params, student_params=s_params, size_ratio=t_params / s_params,
        teacher_latency_ms=t_lat, student_latency_ms=s_lat,
        teacher_bytes=_weight_bytes(teacher), student_bytes=_weight_bytes(student_model),
        latency_method=method, eval_source=eval_source, eval_samples=len(x_val), epochs=epochs,
        hard_label_acc=hard_acc, notes=tuple(notes))
