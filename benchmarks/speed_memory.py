"""Check the CPU performance goals with ``statten bench`` (see docs/performance.md).

Goals, for the CIFAR-10 2-512 recipe at batch 16 on CPU, against the plain eager fp32 model
measured in the same run:

- training step of the fast path >= 0.75 of the same-run fp32 matmul FLOP rate;
- inference of the fast path >= 1.5x the eager images/s;
- peak training memory (process peak RSS) of the fast path <= 0.6x the eager one.

Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python benchmarks/speed_memory.py [--json FILE] [--repeats 5] [statten bench flags]

Prints the bench table and one JSON line with the checked numbers; exits 1 if a goal is missed.
"""

from __future__ import annotations

import json
import sys

from statten.bench import main as bench

RECIPE = ["-c", "conf/cifar10/2_512_200E_t4.yml", "-b", "16", "--device", "cpu"]
GOALS = {
    "train_matmul_fraction": (0.75, "min"),
    "infer_speedup": (1.5, "min"),
    "train_peak_memory_ratio": (0.6, "max"),
}


def check(document: dict) -> dict[str, float | bool]:
    """The goal numbers of a bench document, and whether each holds."""
    fast_train = next(r for r in document["results"] if (r["task"], r["mode"]) == ("train", "fast"))
    values = {
        "train_matmul_fraction": fast_train["derived"]["matmul_fraction"],
        "infer_speedup": document["ratios"]["infer_speedup"],
        "train_peak_memory_ratio": document["ratios"]["train_peak_memory_ratio"],
    }
    result: dict[str, float | bool] = {}
    for name, value in values.items():
        goal, kind = GOALS[name]
        result[name] = round(value, 3)
        result[f"{name}_ok"] = value >= goal if kind == "min" else value <= goal
    result["ok"] = all(v for k, v in result.items() if k.endswith("_ok"))
    return result


if __name__ == "__main__":
    outcome = check(bench([*RECIPE, *sys.argv[1:]]))
    print(json.dumps(outcome))
    sys.exit(0 if outcome["ok"] else 1)
