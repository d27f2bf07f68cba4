"""Print the reliability suite's results as one table.

    python tests/reliability/report.py --run        # run tests/reliability, then print
    python tests/reliability/report.py              # print the last results
    python tests/reliability/report.py --run -- -k kill9   # extra pytest arguments

The tests write ``.reliability/results.json`` (``EDGEPACK_RELIABILITY_RESULTS`` overrides)
after every run of every scenario; this script only reads it. The table is Markdown, so it can
be pasted into the README as is. Exit status: pytest's with ``--run``, else 1 when a scenario
recorded a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("EDGEPACK_RELIABILITY_RESULTS",
                              ROOT / ".reliability" / "results.json"))
HEAD = ("scenario", "runs", "failures", "data lost", "worst recovery")


def _lost(s: dict) -> str:
    text = str(s.get("lost", 0))
    if s.get("dropped"):
        text += f" ({s['dropped']} dropped, counted)"
    return text


def _recovery(s: dict) -> str:
    r = s.get("recovery_s")
    return "-" if r is None else f"{r:.2f} s"


def table(doc: dict) -> str:
    rows = [(name, str(s["runs"]), str(s["failures"]), _lost(s), _recovery(s))
            for name, s in doc.get("scenarios", {}).items()]
    total = (f"total ({len(rows)} scenarios)", str(sum(int(r[1]) for r in rows)),
             str(sum(int(r[2]) for r in rows)),
             str(sum(int(s.get("lost", 0)) for s in doc.get("scenarios", {}).values())),
             max((r[4] for r in rows if r[4] != "-"), default="-",
                 key=lambda v: float(v.split()[0])))
    widths = [max(len(r[i]) for r in [HEAD, *rows, total]) for i in range(len(HEAD))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(HEAD), sep, *(line(r) for r in rows), line(total)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run pytest tests/reliability first")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    rc = 0
    if args.run:
        RESULTS.unlink(missing_ok=True)
        rc = subprocess.call([sys.executable, "-m", "pytest", str(ROOT / "tests" / "reliability"),
                              "-q", *args.pytest_args], cwd=ROOT)
    try:
        doc = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        print(f"no results in {RESULTS}: run with --run", file=sys.stderr)
        return rc or 2
    print(table(doc))
    if not args.run:
        rc = int(any(s["failures"] for s in doc.get("scenarios", {}).values()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
