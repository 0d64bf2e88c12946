"""Check the main job: ``statten train`` with no arguments (the digits recipe).

Goal (issue "statten train / statten test"): validation top-1 >= 95 % in under 5 minutes on a
2-core CPU. Run from the repository root:

    .venv/bin/python benchmarks/digits_default.py [--output DIR]

Prints one JSON line with the wall time, the final top-1 and whether both goals hold; exits 1 if
not.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from statten.cli import main

GOAL_TOP1 = 95.0
GOAL_SECONDS = 300.0


def run(output: Path) -> dict[str, float | bool]:
    start = time.perf_counter()
    status = main(["train", "--output", str(output), "--experiment", "digits-default"])
    seconds = time.perf_counter() - start
    with open(output / "train" / "digits-default" / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    top1 = float(last["eval_top1"])
    return {
        "exit_status": status,
        "seconds": round(seconds, 1),
        "eval_top1": top1,
        "ok": status == 0 and top1 >= GOAL_TOP1 and seconds < GOAL_SECONDS,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.output or Path(tmp))
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
