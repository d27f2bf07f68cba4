"""Tiny models and data the build tests make for themselves (nothing is downloaded).

The MLP is a real digits classifier: scikit-learn trains 64→32→10 weights, and onnx.helper writes
them as Gemm/Relu/Gemm, so accuracy numbers in reports mean something.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IN_NAME = "x"
OUT_NAME = "logits"


@dataclass(frozen=True)
class MlpWeights:
    w1: np.ndarray  # (64, 32)
    b1: np.ndarray  # (32,)
    w2: np.ndarray  # (32, 10)
    b2: np.ndarray  # (10,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The float reference the ONNX graph must reproduce."""
        return np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2


def digits_flat(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): flattened 64-pixel digits in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y))


def train_mlp_weights(x: np.ndarray, y: np.ndarray) -> MlpWeights:
    import warnings

    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, y)
    f = np.float32
    return MlpWeights(clf.coefs_[0].astype(f), clf.intercepts_[0].astype(f),
                      clf.coefs_[1].astype(f), clf.intercepts_[1].astype(f))


def make_mlp(path: Path, w: MlpWeights, *, opset: int = 17, batch: int | str = "N",
             legacy: bool = False, custom_op: bool = False) -> Path:
    """Write a Gemm/Relu/Gemm MLP.

    ``legacy``: every initializer is also listed as a graph input (old exporters did that) and
    ``W2`` is computed by a ConstantOfShape + Add subgraph instead of stored, so pre-flight has to
    fold it before the quantizer can see it as a weight.
    ``custom_op``: the Relu becomes ``com.example:FancyRelu``, which no runtime has.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(IN_NAME, TensorProto.FLOAT, [batch, 64])
    y = helper.make_tensor_value_info(OUT_NAME, TensorProto.FLOAT, [batch, 10])
    inits = [numpy_helper.from_array(w.w1, "W1"), numpy_helper.from_array(w.b1, "B1"),
             numpy_helper.from_array(w.b2, "B2")]
    nodes = [helper.make_node("Gemm", [IN_NAME, "W1", "B1"], ["h"], name="fc1")]
    if custom_op:
        nodes.append(helper.make_node("FancyRelu", ["h"], ["r"], name="act",
                                      domain="com.example"))
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="act"))
    if legacy:
        inits.append(numpy_helper.from_array(w.w2, "W2_delta"))
        inits.append(numpy_helper.from_array(np.array([32, 10], np.int64), "W2_shape"))
        nodes[:0] = [
            helper.make_node("ConstantOfShape", ["W2_shape"], ["W2_zeros"], name="w2_zeros",
                             value=numpy_helper.from_array(np.zeros(1, np.float32))),
            helper.make_node("Add", ["W2_zeros", "W2_delta"], ["W2"], name="w2_add"),
        ]
    else:
        inits.append(numpy_helper.from_array(w.w2, "W2"))
    nodes.append(helper.make_node("Gemm", ["r", "W2", "B2"], [OUT_NAME], name="fc2"))
    inputs = [x]
    if legacy:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in inits]
    graph = helper.make_graph(nodes, "mlp", inputs, [y], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    if custom_op:
        opsets.append(helper.make_opsetid("com.example", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgepack-tests")
    model.ir_version = 7 if opset <= 13 else 8
    if not custom_op:
        onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def make_sklearn_logreg(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """LogisticRegression via skl2onnx: outputs int64 labels and a ZipMap (sequence of maps)."""
    import warnings

    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=500).fit(x, y)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                          target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())
    return path


def rewrite_member(bundle: Path, out: Path, member: str, offset: int | None = None) -> Path:
    """Copy a zip with one member's data changed by one byte (XOR 0x01 at ``offset``)."""
    with zipfile.ZipFile(bundle) as src:
        items = [(info, src.read(info)) for info in src.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info, data in items:
            if info.filename == member:
                pos = len(data) // 2 if offset is None else offset
                data = data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]
            dst.writestr(info, data)
    out.write_bytes(buf.getvalue())
    return out


def member_data_offsets(bundle: Path) -> dict[str, tuple[int, int]]:
    """Where each member's stored (compressed) bytes sit in the file: name → (start, length)."""
    raw = bundle.read_bytes()
    spans = {}
    with zipfile.ZipFile(bundle) as zf:
        for info in zf.infolist():
            h = info.header_offset
            name_len = int.from_bytes(raw[h + 26:h + 28], "little")
            extra_len = int.from_bytes(raw[h + 28:h + 30], "little")
            spans[info.filename] = (h + 30 + name_len + extra_len, info.compress_size)
    return spans


def flip_byte(path: Path, out: Path, offset: int) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    out.write_bytes(bytes(raw))
    return out
