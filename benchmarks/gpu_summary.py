"""The summary table of benchmarks/gpu_checks.sh, from the JSONs of statten bench in OUT_DIR.

    python benchmarks/gpu_summary.py OUT_DIR

Reads OUT_DIR/steps.tsv (step, status, seconds, as gpu_checks.sh writes it) and OUT_DIR/<step>.json
(``statten bench --json``), prints a Markdown table: per step the images/s of the eager fp32
baseline and of the fast mode, fast / eager for training and inference speed and peak memory,
and the fast training step's fraction of the bf16 matmul rate. A ``<step>-compile`` step (fast
mode only, ``--compile``) is compared with the eager run of ``<step>``. Then the goals: training
>= 2x the eager fp32 baseline for sdt CIFAR-10 2-512 at batch 64 and ImageNet 8-768 at batch 32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GOALS = {"sdt-cifar10-2-512-b64": 2.0, "sdt-imagenet-8-768-b32": 2.0}  # training speedup
COMPILE = "-compile"


def _results(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["task"], r["mode"]): r for r in document.get("results", [])}


def _ratio(fast: dict | None, eager: dict | None, key: str) -> float | None:
    if fast is None or eager is None:
        return None
    if key == "images_per_s":
        return fast["derived"][key] / eager["derived"][key]
    return fast[key] / eager[key] if eager[key] else None


def rows(out: Path) -> list[dict[str, Any]]:
    """One dict per step of steps.tsv: status, seconds and, where its JSON exists, the numbers."""
    table, documents = [], {}
    for line in (out / "steps.tsv").read_text().splitlines():
        if not line.strip():
            continue
        name, status, seconds = [*line.split("\t"), "", ""][:3]
        row: dict[str, Any] = {"step": name, "status": status, "seconds": seconds}
        path = out / f"{name}.json"
        if path.exists():
            try:
                documents[name] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                row["status"] = f"{status}; unreadable JSON ({err})"
        document = documents.get(name)
        if document is not None:
            mine = _results(document)
            base = documents.get(name.removesuffix(COMPILE)) if name.endswith(COMPILE) else None
            eager = _results(base) if base is not None else mine
            row.update(recipe=document["recipe"], batch=document["batch_size"])
            row.update(device=document["device_name"], torch=document["torch"])
            for task in ("train", "infer"):
                fast, plain = mine.get((task, "fast")), eager.get((task, "eager"))
                row[f"{task}_eager_ips"] = plain["derived"]["images_per_s"] if plain else None
                row[f"{task}_fast_ips"] = fast["derived"]["images_per_s"] if fast else None
                row[f"{task}_speedup"] = _ratio(fast, plain, "images_per_s")
                row[f"{task}_memory"] = _ratio(fast, plain, "peak_memory_bytes")
                row[f"{task}_fast_peak_gib"] = fast["peak_memory_bytes"] / 2**30 if fast else None
            train_fast = mine.get(("train", "fast"))
            row["train_fast_of_matmul"] = (
                train_fast["derived"]["matmul_fraction"] if train_fast else None
            )
        table.append(row)
    return table


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def render(table: list[dict[str, Any]]) -> str:
    measured = [r for r in table if "device" in r]
    lines = []
    if measured:
        lines.append(f"{measured[0]['device']}, torch {measured[0]['torch']}")
        lines.append("")
    lines += [
        "| step | status (s) | train img/s eager / fast | train x | infer img/s eager / fast "
        "| infer x | train peak mem fast/eager | infer peak mem fast/eager | fast train peak GiB "
        "| fast train of mm rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        state = f"{r['status']} ({r['seconds']})"
        if "device" not in r:
            lines.append(f"| {r['step']} | {state} |" + " - |" * 8)
            continue
        lines.append(
            f"| {r['step']} | {state} "
            f"| {_f(r['train_eager_ips'], 1)} / {_f(r['train_fast_ips'], 1)} "
            f"| {_f(r['train_speedup'])} "
            f"| {_f(r['infer_eager_ips'], 1)} / {_f(r['infer_fast_ips'], 1)} "
            f"| {_f(r['infer_speedup'])} | {_f(r['train_memory'])} | {_f(r['infer_memory'])} "
            f"| {_f(r['train_fast_peak_gib'], 1)} | {_f(r['train_fast_of_matmul'])} |"
        )
    lines.append("")
    by_step = {r["step"]: r for r in table}
    for goal, target in GOALS.items():
        runs = [by_step.get(goal), by_step.get(goal + COMPILE)]
        speeds = {r["step"]: r["train_speedup"] for r in runs if r and r.get("train_speedup")}
        if not speeds:
            lines.append(f"goal {goal}: training >= {target}x eager fp32: not measured")
            continue
        best = max(speeds, key=speeds.get)
        verdict = "met" if speeds[best] >= target else "NOT met"
        lines.append(
            f"goal {goal}: training >= {target}x eager fp32: {verdict} "
            f"({', '.join(f'{k} x{v:.2f}' for k, v in speeds.items())})"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    print(render(rows(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
