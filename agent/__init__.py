"""edgepack device side and the contract shared with the host.

Importing this package must stay light: no TensorFlow, no onnx, nothing from ``edgepack.host``.
"""

__version__ = "0.1.0"
