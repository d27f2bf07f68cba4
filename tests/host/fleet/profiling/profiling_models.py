"""Models and data for the profiling tests: a small conv net whose int8 schemes run at
measurably different speeds on x86 with VNNI, and eval samples the int8 variants agree on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HW = 32
CHANNELS = 64
LAYERS = 4
CLASSES = 10


def convnet(channels: int = CHANNELS, hw: int = HW, layers: int = LAYERS, seed: int = 1) -> bytes:
    """``x[1,3,hw,hw]`` → ``layers`` × (Conv 3x3 + Relu) → GlobalAveragePool → standardize →
    MatMul → ``logits[1,10]``; the standardization (from a forward pass over sample inputs)
    keeps the classes apart, where a deep random net would put every input in one class."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "x", 3
    for i in range(layers):
        cout = channels
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"],
                                      pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, cin = f"r{i}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])

    def model_of(graph_nodes: list, outputs: list, weights: list) -> bytes:
        g = helper.make_graph(graph_nodes, "cnn", [x_info], outputs, weights)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgepack-tests")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()

    trunk = model_of(nodes, [helper.make_tensor_value_info("flat", TensorProto.FLOAT,
                                                           [1, cin])], inits)
    sess = ort.InferenceSession(trunk, providers=["CPUExecutionProvider"])
    sample = _inputs(np.random.default_rng(seed + 99), 64, hw)
    feats = np.concatenate([sess.run(None, {"x": sample[i:i + 1]})[0] for i in range(64)])
    mu = feats.mean(axis=0, keepdims=True).astype(np.float32)
    sd = (feats.std(axis=0, keepdims=True) + 1e-3).astype(np.float32)
    wf = (rng.standard_normal((cin, CLASSES)) / np.sqrt(cin) * 4.0).astype(np.float32)
    inits += [numpy_helper.from_array(mu, "mu"), numpy_helper.from_array(sd, "sd"),
              numpy_helper.from_array(wf, "wf")]
    nodes += [helper.make_node("Sub", ["flat", "mu"], ["centered"], name="center"),
              helper.make_node("Div", ["centered", "sd"], ["z"], name="scale"),
              helper.make_node("MatMul", ["z", "wf"], ["logits"], name="fc")]
    return model_of(nodes, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                          [1, CLASSES])], inits)


def _inputs(rng: np.random.Generator, n: int, hw: int) -> np.ndarray:
    # Per-sample channel offsets and a smooth pattern: global pooling keeps them apart.
    yy, xx = np.meshgrid(np.linspace(-1, 1, hw), np.linspace(-1, 1, hw), indexing="ij")
    base = rng.standard_normal((n, 3, 1, 1)) * 1.5
    fx = rng.uniform(0.5, 3.0, (n, 3, 1, 1))
    pattern = np.sin(fx * np.pi * xx + rng.uniform(0, 6.3, (n, 3, 1, 1))) * \
        np.cos(fx * np.pi * yy) * rng.uniform(0.5, 2.0, (n, 3, 1, 1))
    noise = rng.standard_normal((n, 3, hw, hw)) * 0.3
    return (base + pattern + noise).astype(np.float32)


def write_data(model_bytes: bytes, out_dir: Path, *, n_calib: int = 64, n_eval: int = 40,
               hw: int = HW, seed: int = 1) -> tuple[Path, Path]:
    """Calibration and eval ``.npz`` (eval labels = the fp32 model's classes, chosen among
    samples with a clear top-1 margin so a sound int8 model agrees on all of them)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    calib = _inputs(rng, n_calib, hw)
    pool = _inputs(rng, n_eval * 8, hw)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"x": pool[i:i + 1]})[0] for i in range(len(pool))])
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / (np.abs(logits).max(axis=1) + 1e-6)
    keep = np.argsort(-margin)[:n_eval]
    out_dir.mkdir(parents=True, exist_ok=True)
    cal_path, eval_path = out_dir / "calib.npz", out_dir / "eval.npz"
    np.savez(cal_path, x=calib)
    np.savez(eval_path, x=pool[keep], labels=logits[keep].argmax(axis=1).astype(np.int64))
    return cal_path, eval_path


def tiny_convnet(hw: int = HW, seed: int = 7) -> bytes:
    """Same inputs and outputs as :func:`convnet`, a fraction of the work, unrelated answers:
    the deliberately broken candidate (fastest of all, fails the accuracy gate)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    wf = rng.standard_normal((4, CLASSES)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "wf"], ["logits"], name="fc")]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wf, "wf")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgepack-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
