"""The digits CNN the drift tests and the drift benchmark run (nothing is downloaded).

Same shape as ``examples/digits.py``'s Keras CNN — NHWC 8x8x1 image in [0, 1], two 3x3
convolutions (16 and 32 channels, ReLU), 2x2 max-pool, dense 64 (ReLU), 10 logits — written with
onnx.helper so no TensorFlow is needed: the convolutions keep fixed random (He) weights, the dense
layer holds the features' principal directions and the logits layer is a ridge regression on
one-hot labels (closed form, a few seconds; ~96 % on the held-out digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE = "image"
LOGITS = "logits"


@dataclass(frozen=True)
class DigitsSplit:
    """Train (for the model), reference (calibration + eval) and stream (unseen) images."""

    train: np.ndarray
    train_labels: np.ndarray
    reference: np.ndarray
    stream: np.ndarray
    stream_labels: np.ndarray


def digits_split(seed: int = 0) -> DigitsSplit:
    """1797 digits: 1000 train, 400 reference (200 train + 200 held out), 597 held-out stream."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, held = order[:1000], order[1000:]
    ref = np.concatenate([tr[:200], held[:200]])
    stream = held[200:]
    return DigitsSplit(x[tr], y[tr], x[ref], x[stream], y[stream])


def _conv_graph(w1: np.ndarray, w2: np.ndarray, head: list | None = None,
                head_inits: list | None = None) -> object:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["N", 8, 8, 1])
    nodes = [
        helper.make_node("Transpose", [IMAGE], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["features"]),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    out_name, width = "features", 512
    if head:
        nodes += head
        inits += head_inits
        out_name, width = LOGITS, 10
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", width])
    graph = helper.make_graph(nodes, "digits_cnn", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_digits_cnn(path: Path, split: DigitsSplit | None = None, seed: int = 0) -> Path:
    """Write the trained digits CNN to ``path`` (input ``image`` NHWC, output ``logits``)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    split = split or digits_split(seed)
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 3, 3)) * np.sqrt(2 / 144)).astype(np.float32)
    feats = ort.InferenceSession(_conv_graph(w1, w2).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    f = feats.run(None, {IMAGE: split.train})[0]
    # Dense 64 = ReLU of the top 32 principal directions of the features and their negatives
    # (so the ReLU loses nothing); the logits layer is then a ridge regression on them.
    mean = f.mean(axis=0)
    directions = np.linalg.svd(f - mean, full_matrices=False)[2][:32].T
    d1 = np.concatenate([directions, -directions], axis=1).astype(np.float32)
    b1 = -(mean @ d1).astype(np.float32)
    h = np.concatenate([np.maximum(f @ d1 + b1, 0.0), np.ones((len(f), 1), np.float32)], axis=1)
    target = np.eye(10, dtype=np.float64)[split.train_labels] * 8.0 - 4.0
    solved = np.linalg.solve(h.T @ h + 1e-2 * np.eye(h.shape[1]), h.T @ target)
    d2, b2 = solved[:-1], solved[-1]
    head = [helper.make_node("Gemm", ["features", "D1", "B1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "D2", "B2"], [LOGITS])]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (d1, "D1"), (b1, "B1"), (d2, "D2"), (b2, "B2"))]
    model = _conv_graph(w1, w2, head, inits)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def session(path: Path) -> object:
    """A single-threaded onnxruntime session, as the agent runs bundles on small devices."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build_digits_linear(path: Path, split: DigitsSplit | None = None) -> Path:
    """A tabular digits classifier: 64 pixel features in (``x``), one ridge-fitted Gemm out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    split = split or digits_split()
    x = split.train.reshape(len(split.train), -1).astype(np.float64)
    h = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    target = np.eye(10)[split.train_labels] * 8.0 - 4.0
    solved = np.linalg.solve(h.T @ h + 1e-1 * np.eye(h.shape[1]), h.T @ target)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], [LOGITS])], "digits_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(solved[:-1].astype(np.float32), "W"),
         numpy_helper.from_array(solved[-1].astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@dataclass(frozen=True)
class DigitsCnn:
    """The trained CNN, its session, the data split and the reference profile built from it."""

    path: Path
    split: DigitsSplit
    session: object
    reference: dict

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {IMAGE: images})[0]


def digits_cnn(folder: Path) -> DigitsCnn:
    """Build the CNN in ``folder`` and its reference from the 400 reference images."""
    from edgepack.host.build.drift_reference import make_reference

    split = digits_split()
    path = build_digits_cnn(folder / "digits_cnn.onnx", split)
    sess = session(path)
    ref = make_reference({IMAGE: split.reference},
                         {LOGITS: sess.run(None, {IMAGE: split.reference})[0]},
                         task="classification")
    return DigitsCnn(path, split, sess, ref)


def run_windows(cnn: DigitsCnn, sketcher: object, *, windows: int, calls: int, seed: int,
                transform: object = None) -> list[dict]:
    """Serve ``windows`` x ``calls`` single-image inferences of unseen digits; the payloads."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(windows):
        for i in rng.integers(0, len(cnn.split.stream), calls):
            x = cnn.split.stream[i][None]
            if transform is not None:
                x = transform(x)
            sketcher.observe({IMAGE: x}, {LOGITS: cnn.logits(x)})
        out.append(sketcher.take_window())
    return out
