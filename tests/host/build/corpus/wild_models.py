"""A corpus of models "as users have them", made here (nothing is downloaded).

Each ``make_*`` function writes one artifact into the folder it is given and returns a
:class:`Artifact` (path, inputs to run it with, what it exercises). ``conftest.py`` builds them
once per test session.

ONNX, written with ``onnx.helper`` the way old exporters wrote them:

* ``make_old_opset(d, opset)`` (7, 9, 11): conv net whose conv weight is computed by a constant
  subgraph (``ConstantOfShape`` + ``Add`` from opset 9, ``Transpose`` + ``Mul`` at 7), a reshape
  target built by ``Concat`` of ``Constant`` nodes, and every initializer also listed as a graph
  input (IR 3 at opsets 7 and 9, as the exporters of that time wrote them);
* ``make_external_data(d)``: a small MLP saved with all tensors in an external file
  (``size_threshold=0``: the 2 GB case emulated; ``make_huge_external`` is the real one);
* ``make_fp16(d)``: float16 inputs and weights, a ``Cast`` subgraph to fold;
* ``make_com_microsoft(d)``: ``com.microsoft`` ``Gelu`` and ``FusedMatMul`` beside standard ops;
* ``make_sklearn(d)``: skl2onnx's logistic regression (``ai.onnx.ml`` ops, ZipMap output);
* ``light_graphs()``: the model-zoo graphs shipped in the ``onnx`` package (opset 9).

TFLite, converted with TensorFlow's ``TFLiteConverter`` from a tiny Keras CNN
(``make_tflite(d, kind)``, kind ``"float"``, ``"int8"``, ``"16x8"``, ``"uint8-io"``), and
``make_litert_refused(d)`` (an int8 model whose per-channel zero points LiteRT rejects) and
``make_uint8(d)`` (the int8 model rewritten in the old uint8 scheme).

Keras encoders (``make_keras_encoder(d, gelu)``, ``"exact"`` or ``"tanh"``): Embedding,
MultiHeadAttention, LayerNormalization, GELU and Softmax, saved as ``.keras`` and SavedModel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["Artifact", "LIGHT_NAMES", "light_graphs", "make_old_opset", "make_external_data",
           "make_huge_external", "make_fp16", "make_sklearn", "make_com_microsoft", "make_tflite", "TFLITE_KINDS",
           "make_litert_refused", "make_uint8", "make_keras_encoder", "keras_to_onnx", "run_onnx",
           "agreement"]

LIGHT_NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
               "shufflenet", "squeezenet", "vgg19", "zfnet512")


@dataclass(frozen=True)
class Artifact:
    """One corpus model: where it is, what to feed it, what it exercises."""

    name: str
    path: Path
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    exercises: str = ""


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def light_graphs() -> list[Artifact]:
    """The ``onnx`` package's ``backend/test/data/light`` graphs, as installed."""
    import onnx

    d = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    x = _rng().random((1, 3, 224, 224), dtype=np.float32)
    out = []
    for name in LIGHT_NAMES:
        path = d / f"light_{name}.onnx"
        data = "gpu_0/data_0" if name in ("resnet50", "shufflenet", "zfnet512") else "data_0"
        out.append(Artifact(name, path, {data: x}, "opset 9, ConstantOfShape weights, "
                                                   "initializers listed as inputs"))
    return out


def make_old_opset(d: Path, opset: int) -> Artifact:
    """A conv net as an exporter of opset ``opset`` (7, 9 or 11) wrote it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = _rng(opset)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4,)).astype(np.float32), "conv_b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (10, 64)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    for k, v in {"bn_scale": 1 + rng.random(4), "bn_bias": rng.normal(0, .1, 4),
                 "bn_mean": rng.normal(0, .1, 4), "bn_var": 0.5 + rng.random(4)}.items():
        inits.append(numpy_helper.from_array(v.astype(np.float32), k))
    noise = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    if opset >= 9:  # weight = ConstantOfShape(shape) + noise, as Caffe2 exports did
        inits += [numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "conv_w__SHAPE"),
                  numpy_helper.from_array(noise, "conv_w_noise")]
        weight = [helper.make_node("ConstantOfShape", ["conv_w__SHAPE"], ["conv_w_base"],
                                   value=numpy_helper.from_array(np.array([0.05], np.float32))),
                  helper.make_node("Add", ["conv_w_base", "conv_w_noise"], ["conv_w"])]
    else:  # weight stored transposed and scaled: Transpose + Mul of a Constant
        inits.append(numpy_helper.from_array(noise.transpose(2, 3, 1, 0).copy() * 2, "conv_w_t"))
        weight = [helper.make_node("Transpose", ["conv_w_t"], ["conv_w_raw"], perm=[3, 2, 0, 1]),
                  helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(
                      np.array(0.5, np.float32))),
                  helper.make_node("Mul", ["conv_w_raw", "half"], ["conv_w"])]
    shape = [helper.make_node("Constant", [], ["batch"], value=numpy_helper.from_array(
                 np.array([1], np.int64))),
             helper.make_node("Constant", [], ["flat"], value=numpy_helper.from_array(
                 np.array([64], np.int64))),
             helper.make_node("Concat", ["batch", "flat"], ["flat_shape"], axis=0)]
    bn_attrs = {"epsilon": 1e-5} if opset >= 9 else {"epsilon": 1e-5, "spatial": 1}
    body = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1],
                             name="conv1"),
            helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean",
                                                    "bn_var"], ["bn"], name="bn1", **bn_attrs),
            helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                             name="pool1"),
            helper.make_node("Reshape", ["p", "flat_shape"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    as_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(weight + shape + body, f"old_opset{opset}", [x, *as_inputs],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                             [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="edgepack-corpus")
    model.ir_version = 3 if opset < 11 else 6
    path = d / f"old_opset{opset}.onnx"
    onnx.save_model(model, str(path))
    return Artifact(f"old_opset{opset}", path, {"x": _rng(1).random((1, 3, 8, 8), np.float32)},
                    f"opset {opset}, constant-subgraph weight, initializers listed as inputs")


def _mlp(name: str, dtype: type, widths: tuple[int, ...], seed: int = 0):
    """Nodes and initializers of a MatMul/Add/Relu MLP ending in Softmax."""
    from onnx import helper, numpy_helper

    rng = _rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        w = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(dtype)
        inits += [numpy_helper.from_array(w, f"{name}_w{i}"),
                  numpy_helper.from_array(rng.normal(0, .1, b).astype(dtype), f"{name}_b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"{name}_w{i}"], [f"mm{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"mm{i}", f"{name}_b{i}"], [f"h{i}"], name=f"add{i}")]
        prev = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["y"], axis=-1, name="softmax"))
    return nodes, inits


def _save_mlp(d: Path, name: str, nodes, inits, elem: int, width_in: int, width_out: int,
              opset: int = 13, **save: object) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", elem,
                                                                          ["batch", width_in])],
                              [helper.make_tensor_value_info("y", elem, ["batch", width_out])],
                              inits)
    opsets = [helper.make_opsetid("", opset)]
    if any(n.domain == "com.microsoft" for n in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgepack-corpus")
    model.ir_version = 8
    path = d / f"{name}.onnx"
    onnx.save_model(model, str(path), **save)
    return path


def make_external_data(d: Path) -> Artifact:
    """All tensors in ``external_data.onnx.data`` (``size_threshold=0``; the real >2 GB case is
    ``make_huge_external``)."""
    from onnx import TensorProto

    nodes, inits = _mlp("ext", np.float32, (32, 64, 64, 8))
    path = _save_mlp(d, "external_data", nodes, inits, TensorProto.FLOAT, 32, 8,
                     save_as_external_data=True, all_tensors_to_one_file=True,
                     location="external_data.onnx.data", size_threshold=0)
    return Artifact("external_data", path, {"x": _rng(2).random((4, 32), np.float32)},
                    "every tensor in an external file")


def make_huge_external(d: Path) -> Artifact:
    """A 2.15 GB Gather table in external data (over the protobuf limit) plus a bias made by
    ``ConstantOfShape``. The data file is written directly: building a >2 GB proto in memory
    first takes minutes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, width = 262_144, 2_048  # 2^29 float32 = 2.15 GB; row i holds i / rows
    with open(d / "huge.onnx.data", "wb") as f:
        for i in range(0, rows, 16_384):
            block = np.arange(i, i + 16_384, dtype=np.float32)[:, None] / rows
            np.repeat(block, width, axis=1).tofile(f)
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width],
                        data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "huge.onnx.data"), ("offset", "0"),
                       ("length", str(rows * width * 4))):
        table.external_data.add(key=key, value=value)
    nodes = [helper.make_node("ConstantOfShape", ["bias__SHAPE"], ["bias"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0, name="lookup"),
             helper.make_node("Add", ["rows", "bias"], ["y"], name="add_bias")]
    graph = helper.make_graph(
        nodes, "huge", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])],
        [table, numpy_helper.from_array(np.array([width], np.int64), "bias__SHAPE")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    path = d / "huge.onnx"
    onnx.save_model(model, str(path))
    return Artifact("huge_external", path, {"ids": np.array([0, 7, 100_000, rows - 1])},
                    "2.15 GB of external data, opset 11")


def make_fp16(d: Path) -> Artifact:
    """float16 end to end; the first weight is stored float32 and cast (a subgraph to fold)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = _mlp("half", np.float16, (16, 32, 4), seed=3)
    w0 = inits[0]
    inits[0] = numpy_helper.from_array(numpy_helper.to_array(w0).astype(np.float32), "w0_fp32")
    nodes.insert(0, helper.make_node("Cast", ["w0_fp32"], [w0.name], to=TensorProto.FLOAT16))
    path = _save_mlp(d, "fp16", nodes, inits, TensorProto.FLOAT16, 16, 4)
    return Artifact("fp16", path, {"x": _rng(4).random((3, 16)).astype(np.float16)},
                    "float16 inputs and weights, Cast subgraph")


def make_com_microsoft(d: Path) -> Artifact:
    """``com.microsoft`` Gelu and FusedMatMul (as onnxruntime's transformer tools write them)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = _rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, .2, (24, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .2, (24, 8)).astype(np.float32), "w2_raw"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Mul", ["w2_raw", "two"], ["w2"], name="scale_w2"),  # foldable
             helper.make_node("FusedMatMul", ["x", "w1"], ["h"], domain="com.microsoft",
                              alpha=0.5, name="fused_mm"),
             helper.make_node("Gelu", ["h"], ["g"], domain="com.microsoft", name="gelu"),
             helper.make_node("MatMul", ["g", "w2"], ["logits"], name="mm2"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")]
    path = _save_mlp(d, "com_microsoft", nodes, inits, TensorProto.FLOAT, 24, 8, opset=14)
    return Artifact("com_microsoft", path, {"x": _rng(6).random((2, 24), np.float32)},
                    "com.microsoft Gelu and FusedMatMul")


def make_sklearn(d: Path) -> Artifact:
    """A scikit-learn logistic regression by skl2onnx: ``ai.onnx.ml`` ops and a ZipMap output."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = _rng(9)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    clf = LogisticRegression(max_iter=200).fit(x, (x[:, 0] + x[:, 1] > 0).astype(np.int64))
    path = d / "sklearn_logreg.onnx"
    path.write_bytes(to_onnx(clf, x[:1], target_opset={"": 13, "ai.onnx.ml": 3})
                     .SerializeToString())
    return Artifact("sklearn_logreg", path, {"X": x[:8]}, "ai.onnx.ml ops, ZipMap output")


def _keras_cnn():
    """A tiny image CNN (16x16x3 → 10), random weights, fixed seed."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16, 16, 3), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 1, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(48, activation="relu"),  # 1536 weights: dynamic range quantizes it
        keras.layers.Dense(10),
        keras.layers.Softmax(),
    ])


TFLITE_KINDS = ("float", "int8", "16x8", "uint8-io", "dynamic", "float16")


def make_tflite(d: Path, kind: str) -> Artifact:
    """The tiny CNN converted by ``TFLiteConverter``: ``float`` (for a microcontroller),
    ``int8`` (full integer, int8 I/O), ``16x8`` (int16 activations, int8 weights),
    ``uint8-io`` (int8 inside, uint8 I/O), ``dynamic`` (int8 weights, float activations) or
    ``float16`` (float16 weights dequantized at load)."""
    import tensorflow as tf

    sm = d / "cnn_savedmodel"
    if not sm.exists():
        _keras_cnn().export(str(sm), format="tf_saved_model", verbose=False)
    x = _rng(7).random((32, 16, 16, 3), np.float32)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(sm))
    if kind != "float":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if kind in ("int8", "16x8", "uint8-io"):
        conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    if kind in ("int8", "uint8-io"):
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = (
            tf.int8 if kind == "int8" else tf.uint8)
    if kind == "16x8":
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int16
    path = d / f"cnn_{kind}.tflite"
    path.write_bytes(conv.convert())
    return Artifact(f"tflite_{kind}", path, {"image": x[:1]}, f"TFLite {kind}")


def _edit_tflite(src: Path, dst: Path, edit: Callable[[Any, Any], None]) -> Path:
    """Rewrite a .tflite through the schema's object API: ``edit(schema, model)``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(src.read_bytes(), 0))
    edit(s, model)
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    dst.write_bytes(bytes(b.Output()))
    return dst


def _int8_source(d: Path) -> Path:
    path = d / "cnn_int8.tflite"
    return path if path.exists() else make_tflite(d, "int8").path


def make_litert_refused(d: Path) -> Artifact:
    """The int8 CNN with non-zero per-channel weight zero points: TFLite Micro runs it, LiteRT's
    conv kernel refuses it (as it does with some older published int8 models)."""

    def edit(s: Any, model: Any) -> None:
        sub = model.subgraphs[0]
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) == s.BuiltinOperator.CONV_2D:
                q = sub.tensors[op.inputs[1]].quantization
                q.zeroPoint = [1] * len(q.scale)
                return

    path = _edit_tflite(_int8_source(d), d / "cnn_int8_refused.tflite", edit)
    return Artifact("tflite_litert_refused", path, {}, "int8, per-channel zero points ≠ 0")


def make_uint8(d: Path) -> Artifact:
    """The int8 CNN rewritten in the old asymmetric uint8 scheme (as TF1 quantization-aware
    training wrote models): every int8 tensor becomes uint8, values and zero points + 128."""

    def edit(s: Any, model: Any) -> None:
        for t in model.subgraphs[0].tensors:
            if t.type != s.TensorType.INT8:
                continue
            t.type = s.TensorType.UINT8
            if t.quantization is not None and t.quantization.zeroPoint is not None:
                t.quantization.zeroPoint = [int(z) + 128 for z in t.quantization.zeroPoint]
            buf = model.buffers[t.buffer]
            if buf.data is not None and len(buf.data):
                buf.data = (np.asarray(buf.data, np.uint8) + 128).astype(np.uint8)

    path = _edit_tflite(_int8_source(d), d / "cnn_uint8.tflite", edit)
    return Artifact("tflite_uint8", path, {}, "uint8 activations and weights")


def _gelu_tanh(x):
    import keras

    return keras.activations.gelu(x, approximate=True)


def make_keras_encoder(d: Path, gelu: str) -> Artifact:
    """A one-block transformer encoder over 16 token ids: Embedding (+ learned positions),
    MultiHeadAttention, LayerNormalization, a GELU feed-forward (``gelu`` "exact" or "tanh"),
    pooled into a 4-way Softmax. Saved as ``.keras`` and as a SavedModel (``<name>_sm``)."""
    import keras

    keras.utils.set_random_seed(11)
    act = "gelu" if gelu == "exact" else keras.saving.register_keras_serializable(
        "edgepack_corpus", "gelu_tanh")(_gelu_tanh)
    seq, vocab, width = 16, 64, 32
    ids = keras.Input((seq,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab, width, name="tokens")(ids)
    pos = keras.layers.Embedding(seq, width, name="positions")(keras.ops.arange(seq)[None, :])
    x = x + pos
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=width // 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(x + att)
    ff = keras.layers.Dense(width * 2, activation=act, name="ff_in")(x)
    x = keras.layers.LayerNormalization(name="ln2")(x + keras.layers.Dense(width, name="ff_out")(ff))
    x = keras.layers.GlobalAveragePooling1D()(x)
    y = keras.layers.Softmax(name="probs")(keras.layers.Dense(4, name="head")(x))
    model = keras.Model(ids, y, name=f"encoder_gelu_{gelu}")
    path = d / f"encoder_gelu_{gelu}.keras"
    model.save(str(path))
    model.export(str(d / f"encoder_gelu_{gelu}_sm"), format="tf_saved_model", verbose=False)
    tokens = _rng(12).integers(0, vocab, (2, seq)).astype(np.int32)
    return Artifact(f"encoder_gelu_{gelu}", path, {"ids": tokens},
                    f"Embedding, MultiHeadAttention, LayerNormalization, GELU ({gelu}), Softmax")


def keras_to_onnx(saved_model: Path, out: Path, opset: int = 17) -> Path:
    """tf2onnx on a SavedModel, in a child process (as edgepack converts Keras 3 models)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model",
                        str(saved_model), "--output", str(out), "--opset", str(opset)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"tf2onnx failed: {r.stderr[-2000:]}")
    return out


def run_onnx(model_or_path: object, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime on CPU for a path or an in-memory ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = str(model_or_path) if isinstance(model_or_path, Path) else \
        model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs diff, cosine similarity) of two outputs, in float64."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom else float(np.allclose(a, b))
    return float(np.abs(a - b).max()), cos
