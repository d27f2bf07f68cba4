"""`make demo`: the whole edgepack loop on one machine, nothing installed by hand.

1. trains a small CNN on scikit-learn's digits data and exports it to ONNX;
2. generates a fleet signing key and builds a signed int8 bundle for a Raspberry Pi 4;
3. verifies the bundle like a device would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
sys.path.insert(0, str(ROOT / "examples"))


def edgepack(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgepack.host.cli", *args]
    print(f"\n$ edgepack {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, cwd=WORK)


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    WORK.mkdir(exist_ok=True)
    from digits import write_digits_example

    if not (WORK / "digits.onnx").exists():
        print("training a small CNN on scikit-learn's digits data …", flush=True)
        write_digits_example(WORK)
    if not (WORK / "keys" / "fleet.key").exists():
        edgepack("keys", "generate", "--out", "keys")
    edgepack("build", "digits.onnx", "--target", "rpi4", "--calibration", "calib.npz",
             "--eval", "eval.npz", "--key", "keys/fleet.key", "--out", "dist")
    bundle = "dist/digits-1.0.0-rpi4.edgepack"
    edgepack("verify", bundle, "--pub", "keys/fleet.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
