"""benchmarks/gpu_checks.sh, the prepared GPU run: it parses, names real recipes, and sums up."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from statten import bench
from statten.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
FAMILIES = ("sdt", "spikformer", "qkformer", "sdtv2")


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT.with_name("gpu_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(tmp_path: Path) -> list[tuple[str, list[str]]]:
    env = {**os.environ, "DRY_RUN": "1"}
    for name in ("ONLY", "BATCH", "REPEATS", "WARMUP", "BENCH_FLAGS", "SKIP_TESTS", "SKIP_COMPILE"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    steps = []
    for line in done.stdout.splitlines():
        if line.startswith("step "):
            name, command = line.removeprefix("step ").split(":", 1)
            steps.append((name, shlex.split(command)))
    return steps


def test_the_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_every_step_names_a_recipe_that_exists_and_parses(tmp_path: Path) -> None:
    steps = _dry_run(tmp_path)
    names = [name for name, _ in steps]
    assert names[0] == "cuda-tests"
    benches = [(name, command) for name, command in steps if "bench" in command]
    # The two goals come first, the optional torch.compile runs last.
    assert [name for name, _ in benches[:2]] == ["sdt-cifar10-2-512-b64", "sdt-imagenet-8-768-b32"]
    compiled = [name for name, command in benches if "--compile" in command]
    assert compiled and names[-len(compiled) :] == compiled
    covered = set()
    for name, command in benches:
        args = command[command.index("bench") + 1 :]
        assert args[args.index("--device") + 1] == "cuda"
        recipe = args[args.index("-c") + 1]
        assert (ROOT / recipe).is_file(), recipe
        args[args.index("-c") + 1] = str(ROOT / recipe)
        args[args.index("--device") + 1] = "cpu"  # parse_config refuses cuda without CUDA
        options, rest = bench._parser().parse_known_args(args)
        cfg = parse_config(rest, "train")
        assert name.startswith(f"{cfg.model}-"), (name, cfg.model)
        assert cfg.batch_size == int(name.split("-b")[-1].split("-")[0])
        assert options.repeats >= 5
        covered.add((cfg.model, "imagenet" in recipe))
    assert covered == {(family, imagenet) for family in FAMILIES for imagenet in (False, True)}


def _document(
    step_seconds: dict[tuple[str, str], float], peaks: dict[tuple[str, str], int]
) -> dict:
    results = []
    for (task, mode), seconds in step_seconds.items():
        results.append(
            {
                "task": task,
                "mode": mode,
                "peak_memory_bytes": peaks[task, mode],
                "derived": {"images_per_s": 64 / seconds, "matmul_fraction": 0.25},
            }
        )
    return {
        "recipe": "conf/cifar10/2_512_200E_t4.yml",
        "batch_size": 64,
        "device_name": "NVIDIA H200",
        "torch": "2.11.0",
        "results": results,
    }


def test_the_summary_compares_fast_and_compiled_runs_with_eager(tmp_path: Path) -> None:
    gib = 2**30
    (tmp_path / "steps.tsv").write_text(
        "cuda-tests\tok\t12\n"
        "sdt-cifar10-2-512-b64\tok\t60\n"
        "sdt-imagenet-8-768-b32\tfailed (timed out)\t180\n"
        "sdt-cifar10-2-512-b64-compile\tok\t90\n"
    )
    eager_fast = {("train", "eager"): 0.4, ("train", "fast"): 0.25, ("infer", "eager"): 0.1}
    eager_fast[("infer", "fast")] = 0.05
    peaks = {key: 4 * gib for key in eager_fast} | {("train", "fast"): 2 * gib}
    (tmp_path / "sdt-cifar10-2-512-b64.json").write_text(json.dumps(_document(eager_fast, peaks)))
    compiled = {("train", "fast"): 0.1, ("infer", "fast"): 0.04}
    (tmp_path / "sdt-cifar10-2-512-b64-compile.json").write_text(
        json.dumps(_document(compiled, {key: gib for key in compiled}))
    )
    summary = _summary_module()
    rows = {row["step"]: row for row in summary.rows(tmp_path)}
    assert rows["sdt-cifar10-2-512-b64"]["train_speedup"] == pytest.approx(1.6)
    assert rows["sdt-cifar10-2-512-b64"]["infer_speedup"] == pytest.approx(2.0)
    assert rows["sdt-cifar10-2-512-b64"]["train_memory"] == pytest.approx(0.5)
    assert rows["sdt-cifar10-2-512-b64-compile"]["train_speedup"] == pytest.approx(4.0)
    assert rows["sdt-cifar10-2-512-b64-compile"]["infer_memory"] == pytest.approx(0.25)
    text = summary.render(list(rows.values()))
    assert "goal sdt-cifar10-2-512-b64: training >= 2.0x eager fp32: met" in text
    assert "sdt-cifar10-2-512-b64-compile x4.00" in text
    assert "goal sdt-imagenet-8-768-b32: training >= 2.0x eager fp32: not measured" in text
    assert "| sdt-imagenet-8-768-b32 | failed (timed out) (180) |" in text
