"""``statten bench``: speed and memory of a recipe, read against what the hardware can do.

For a recipe (``-c conf/...yml`` plus any ``statten train`` flag), batch size (``-b``) and device
(``--device``), measures training-step and inference throughput (images/s) and peak memory of the
plain eager fp32 model (``eager``, the baseline) and of the fast paths of :mod:`statten.fast`
(``fast``), each in its own process. Every result is also read as a fraction of the device's
matrix-multiply rate, measured in the same processes between the timed steps (fp32 ``torch.mm``
on CPU, bf16 on GPU), from the model's counted FLOPs (conv/linear/matmul multiply-adds x 2; a
training step counts 3x the forward pass). ``--json FILE`` writes all numbers.

    statten bench -c conf/cifar10/2_512_200E_t4.yml -b 16 --device cpu --json bench.json

``--tasks attention`` (alone, or with ``train`` / ``infer``) adds the attention-cost table
(:mod:`statten.analysis.attention_cost`): the recipe's model rebuilt at T = 4, 8, 16
(``--attention-time-steps``) with STAtten at every chunk size dividing T and with the family's
native attention, each counted by ``OpRecorder`` on one random sample after BatchNorm
calibration, and timed if ``--attention-repeats`` is above 0.

With ``--spike-driven`` the fast training mode also runs spike-driven convolutions
(:mod:`statten.fast.spike_conv`); fast inference always does.

Inference runs a model whose BatchNorm statistics are calibrated on the random batch
(:func:`calibrate_batchnorm`), so that its layers fire as in training.

Peak memory: on CPU the peak resident set size (``VmHWM``) of the measuring process, also
given above the process's size right after its imports; on GPU ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from statten.analysis.attention_cost import (
    STATTEN,
    AttentionCost,
    AttentionVariant,
    attention_cost,
    attention_variants,
    compare,
    count_ops,
    format_table,
    same_cost_as_spatial,
)
from statten.config import (
    StrictParser,
    at_least,
    config_from_dict,
    config_to_dict,
    model_config,
    parse_config,
)
from statten.engine.losses import time_averaged
from statten.factory import create_model
from statten.models.family import get_family

__all__ = [
    "ATTENTION_TASK",
    "MODES",
    "TASKS",
    "Result",
    "attention_cost_table",
    "main",
    "matmul_rate",
    "measure",
    "training_model",
]

TASKS = ("train", "infer")  # timed, in every mode
ATTENTION_TASK = "attention"  # the attention-cost table, counted once per attention variant
ATTENTION_TIME_STEPS = (4, 8, 16)
ATTENTION_SAMPLES = 1  # random samples per variant: BatchNorm calibration, counts and timing
MODES = ("eager", "fast")
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (input and weight gradients) ~ 3 forwards


@dataclass
class Result:
    """One measurement (a task in a mode), from its own process."""

    task: str
    mode: str
    batch_size: int
    step_seconds: list[float]
    matmul_flops_per_s: list[float]
    peak_memory_bytes: int
    memory_after_import_bytes: int
    flops_per_step: float = 0.0
    derived: dict[str, float] = field(default_factory=dict)

    def summarize(self) -> None:
        """Medians, throughput and the fraction of the matmul rate, into ``derived``."""
        step = statistics.median(self.step_seconds)
        matmul = statistics.median(self.matmul_flops_per_s)
        self.derived = {
            "step_seconds_median": step,
            "images_per_s": self.batch_size / step,
            "flops_per_s": self.flops_per_step / step,
            "matmul_flops_per_s_median": matmul,
            "matmul_fraction": self.flops_per_step / step / matmul,
            "peak_memory_above_import_bytes": self.peak_memory_bytes
            - self.memory_after_import_bytes,
        }


# -- what runs in the measuring process ---------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of ``repeats`` back-to-back ``size x size`` matrix products (fp32 CPU, bf16 GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _inputs(model: nn.Module, batch: int, device: torch.device) -> Any:
    """A random batch of the model's input shape (images, or event frames), and targets."""
    images = model.example_input(batch, device)
    targets = torch.randint(0, max(model.num_classes, 1), (batch,), device=device)
    return images, targets


def _channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def _channels_last_weights(model: nn.Module) -> bool:
    """Whether the model's first spatial convolution is laid out channels-last (its inputs
    should be too)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight[0, 0].numel() > 1:
            return not module.weight.is_contiguous()
    return False


def _autocast(mode: str, device: torch.device) -> torch.autocast:
    """bf16 autocast for the fast mode on GPU; fp32 otherwise."""
    enabled = mode == "fast" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _use_kernels(fused: bool) -> None:
    """Fused LIF kernels (C on CPU, torch.compile on GPU), or torch operations step by step."""
    from statten.fast import use_native_kernels

    use_native_kernels(fused)


def training_model(
    spec: dict[str, Any], cfg: argparse.Namespace, device: torch.device
) -> nn.Module:
    """The model a training measurement runs: the plain eager one, or in fast mode the one of
    :func:`~statten.fast.optimize_for_training`, spike-driven too with ``--spike-driven``."""
    from statten.fast import optimize_for_training

    model = create_model(cfg.model, **model_config(cfg)).to(device).train()
    model.memory_efficient = False  # the plain eager baseline; fast mode switches it on
    if spec["mode"] == "fast":
        _use_kernels(spec["fused_kernels"])
        optimize_for_training(model, compile_kernels=spec["fused_kernels"])
        model.spike_driven = cfg.spike_driven
    return model


def _train_step(spec: dict[str, Any], cfg: argparse.Namespace, device: torch.device) -> Callable:
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    model = training_model(spec, cfg, device)
    images, targets = _inputs(model, spec["batch_size"], device)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg))
    if _channels_last_weights(model):
        images = _channels_last(images)
    forward = torch.compile(model) if spec["compile"] and spec["mode"] == "fast" else model

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(time_averaged(logits, model.per_step_logits), target)

    def step() -> None:
        with _autocast(spec["mode"], device):
            out = forward(images)
            loss = model.loss(out, targets, criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, chunk: int = 4) -> None:
    """Set BatchNorm's running statistics to those of ``images``, then switch to eval mode.

    An untrained model's default statistics (mean 0, variance 1) silence every layer after the
    first, so inference would run on all-zero spikes; calibrated, layers fire as in training.
    The statistics are averaged over chunks of ``chunk`` images, so that calibrating does not
    raise the process's peak memory above that of the inference being measured.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the passes
    model.train()
    for part in images.split(chunk):
        model(part)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def inference_model(
    cfg: argparse.Namespace, batch: int, device: torch.device
) -> tuple[nn.Module, torch.Tensor]:
    """The recipe's model, BatchNorm calibrated on a random batch, in eval mode; and the batch."""
    model = create_model(cfg.model, **model_config(cfg)).to(device)
    images, _ = _inputs(model, batch, device)
    calibrate_batchnorm(model, images)
    return model, images


def inference_firing_rate(cfg: argparse.Namespace) -> float:
    """Mean firing rate of the neuron layers in the inference measurement (same model and batch)."""
    from statten.analysis import SpikeRecorder

    torch.manual_seed(cfg.seed)
    model, images = inference_model(cfg, cfg.batch_size, torch.device(cfg.device))
    with torch.no_grad(), SpikeRecorder(model) as recorder:
        model(images)
    return statistics.fmean(recorder.mean_firing_rates().values())


def _infer_step(spec: dict[str, Any], cfg: argparse.Namespace, device: torch.device) -> Callable:
    from statten.fast import optimize_for_inference

    model, images = inference_model(cfg, spec["batch_size"], device)
    if spec["mode"] == "fast":
        _use_kernels(spec["fused_kernels"])
        fused = spec["fused_kernels"]
        model = optimize_for_inference(model, compile_kernels=fused, spike_driven=fused)
        images = _channels_last(images)
    forward = torch.compile(model) if spec["compile"] and spec["mode"] == "fast" else model

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(time_averaged(logits, model.per_step_logits), target)

    def step() -> None:
        with torch.inference_mode(), _autocast(spec["mode"], device):
            forward(images)

    return step


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started running its own program.

    On Linux ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would do, except that a process
    started with fork or vfork and exec inherits its parent's high-water mark, which would hide
    any peak below the parent's (the parent has built a model to count its FLOPs).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure(spec: dict[str, Any], memory_after_import: int = 0) -> Result:
    """Time ``spec["repeats"]`` steps of one task in one mode, in this process."""
    cfg = config_from_dict(spec["config"], "train")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    build = _train_step if spec["task"] == "train" else _infer_step
    step = build(spec, cfg, device)
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    seconds, rates = [], []
    for _ in range(spec["repeats"]):
        rates.append(matmul_rate(device, spec["matmul_size"]))
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return Result(
        spec["task"], spec["mode"], spec["batch_size"], seconds, rates, peak, memory_after_import
    )


def _worker(spec_path: str, result_path: str) -> None:
    after_import = peak_rss_bytes()
    spec = json.loads(Path(spec_path).read_text())
    result = measure(spec, after_import if spec["config"]["device"] == "cpu" else 0)
    Path(result_path).write_text(json.dumps(asdict(result)))


# -- the parent: one process per measurement ----------------------------------------------------


def run_isolated(spec: dict[str, Any], workdir: Path) -> Result:
    """Run :func:`measure` for ``spec`` in a fresh Python process (its own peak memory)."""
    name = f"{spec['task']}-{spec['mode']}"
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "statten.bench", "--worker", str(spec_path), str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process {name} failed:\n{done.stderr[-4000:]}")
    return Result(**json.loads(result_path.read_text()))


def count_forward_flops(cfg: argparse.Namespace) -> float:
    """Counted FLOPs of one forward pass of one sample (conv/linear/matmul MACs x 2)."""
    model = create_model(cfg.model, **model_config(cfg)).eval()
    images, _ = _inputs(model, 1, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return float(counter.get_total_flops())


# -- the attention-cost table (in this process) -------------------------------------------------


def native_attention(model: str) -> str:
    """The family's own attention mode: the one of its modes that is not STAtten."""
    return next(mode for mode in get_family(model).attention_modes if mode != STATTEN)


def variant_config(cfg: argparse.Namespace, variant: AttentionVariant) -> argparse.Namespace:
    """``cfg`` with the time steps, attention mode and chunk size of ``variant``."""
    return argparse.Namespace(
        **{
            **vars(cfg),
            "time_steps": variant.time_steps,
            "attention_mode": variant.attention_mode,
            "chunk_size": variant.chunk_size,
        }
    )


def seconds_per_image(model: nn.Module, images: torch.Tensor, repeats: int) -> float | None:
    """Median time of ``repeats`` inference passes over ``images``, per image (None if 0)."""
    if not repeats:
        return None
    device = images.device
    seconds = []
    with torch.inference_mode():
        model(images)  # warm-up
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(images)
            _sync(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / images.shape[0]


def measure_attention_variant(
    cfg: argparse.Namespace, variant: AttentionVariant, repeats: int
) -> AttentionCost:
    """Counts (and time) of the recipe's model built as ``variant``, BatchNorm calibrated on
    :data:`ATTENTION_SAMPLES` random samples. Every variant starts from the same seed, so the
    variants of one ``T`` share their weights and input."""
    torch.manual_seed(cfg.seed)
    model, images = inference_model(
        variant_config(cfg, variant), ATTENTION_SAMPLES, torch.device(cfg.device)
    )
    layers = count_ops(model, images, variant.time_steps, ATTENTION_SAMPLES)
    params = sum(p.numel() for p in model.parameters())
    return attention_cost(
        variant, layers, params, seconds_per_image=seconds_per_image(model, images, repeats)
    )


def attention_cost_table(
    cfg: argparse.Namespace, time_steps: Sequence[int], repeats: int = 0
) -> list[AttentionCost]:
    """STAtten at every chunk size versus the family's native attention, at each ``T``."""
    variants = attention_variants(time_steps, native_attention(cfg.model))
    costs = [measure_attention_variant(cfg, variant, repeats) for variant in variants]
    compare(costs)
    return costs


def attention_cost_document(
    cfg: argparse.Namespace, time_steps: Sequence[int], repeats: int
) -> dict[str, Any]:
    """The attention-cost table as the ``attention_cost`` entry of the JSON document."""
    start = time.perf_counter()
    costs = attention_cost_table(cfg, time_steps, repeats)
    return {
        "model": cfg.model,
        "native_attention": native_attention(cfg.model),
        "time_steps": list(time_steps),
        "samples": ATTENTION_SAMPLES,
        "timing_repeats": repeats,
        "same_cost_as_spatial": same_cost_as_spatial(costs),
        "seconds": time.perf_counter() - start,
        "rows": [asdict(cost) for cost in costs],
    }


def _attention_report(document: dict[str, Any]) -> str:
    costs = [AttentionCost(**row) for row in document["rows"]]
    return "\n".join(
        [
            f"attention cost per image: {document['model']}, STAtten versus "
            f"{document['native_attention']} (native); OpRecorder counts on "
            f"{document['samples']} random sample(s), BatchNorm calibrated on it; token mix = "
            f"the attention products; {document['seconds']:.1f} s",
            format_table(costs),
        ]
    )


# -- the command --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="statten bench",
        description="Training and inference speed and peak memory of a recipe, eager baseline "
        "versus statten.fast, against the device's matmul rate. Any `statten train` flag "
        "(-c CONFIG, -b BATCH, --device, --json FILE, ...) selects what is measured.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=(*TASKS, ATTENTION_TASK),
        default=list(TASKS),
        help=f"what to measure (default: {' '.join(TASKS)}); {ATTENTION_TASK}: the table of "
        "STAtten versus native attention cost",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--repeats", type=at_least(1), default=5, help="timed steps per measurement"
    )
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    parser.add_argument(
        "--matmul-size", type=at_least(1), default=2048, help="side of the timed mm"
    )
    parser.add_argument(
        "--eager-kernels",
        action="store_true",
        help="fast mode without compiled code (no C compiler needed): LIF kernels as torch "
        "operations, dense convolutions",
    )
    parser.add_argument(
        "--compile", action="store_true", help="fast mode: also torch.compile the whole model"
    )
    parser.add_argument(
        "--attention-time-steps",
        nargs="+",
        type=at_least(1),
        default=list(ATTENTION_TIME_STEPS),
        help="attention task: the T values of its table",
    )
    parser.add_argument(
        "--attention-repeats",
        type=at_least(0),
        default=0,
        help="attention task: timed inference passes per variant (0: counts only)",
    )
    return parser


def _ratios(results: dict[tuple[str, str], Result]) -> dict[str, float]:
    ratios = {}
    for task in TASKS:
        eager, fast = results.get((task, "eager")), results.get((task, "fast"))
        if eager is None or fast is None:
            continue
        speed = fast.derived["images_per_s"] / eager.derived["images_per_s"]
        ratios[f"{task}_speedup"] = speed
        ratios[f"{task}_peak_memory_ratio"] = fast.peak_memory_bytes / eager.peak_memory_bytes
        above = fast.derived["peak_memory_above_import_bytes"]
        if eager.derived["peak_memory_above_import_bytes"] > 0:
            ratios[f"{task}_peak_memory_above_import_ratio"] = (
                above / eager.derived["peak_memory_above_import_bytes"]
            )
    return ratios


def _report(summary: dict[str, Any], results: list[Result]) -> str:
    gib = 2**30
    lines = [
        f"statten bench: {summary['recipe']}, batch {summary['batch_size']}, "
        f"{summary['device_name']}, {summary['threads']} threads",
        f"matmul rate ({summary['matmul_dtype']}, median of all samples): "
        f"{summary['matmul_flops_per_s_median'] / 1e9:.1f} GFLOP/s",
        f"counted FLOPs per image: forward {summary['forward_flops_per_image'] / 1e9:.3f} G, "
        f"training step {summary['train_flops_per_image'] / 1e9:.3f} G",
    ]
    if "inference_mean_firing_rate" in summary:
        lines.append(
            "inference: BatchNorm calibrated on the batch, mean firing rate of the neuron layers "
            f"{summary['inference_mean_firing_rate']:.3f}"
        )
    lines += [
        "",
        f"{'task':6} {'mode':6} {'img/s':>9} {'step s':>9} {'GFLOP/s':>9} {'of mm':>6} "
        f"{'peak mem GiB':>12} {'above import':>12}",
    ]
    for r in results:
        d = r.derived
        lines.append(
            f"{r.task:6} {r.mode:6} {d['images_per_s']:9.2f} {d['step_seconds_median']:9.4f} "
            f"{d['flops_per_s'] / 1e9:9.1f} {d['matmul_fraction']:6.2f} "
            f"{r.peak_memory_bytes / gib:12.3f} {d['peak_memory_above_import_bytes'] / gib:12.3f}"
        )
    lines += [
        "",
        "fast / eager: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items()),
    ]
    return "\n".join(lines)


def _specs(args: argparse.Namespace, cfg: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        "config": config_to_dict(cfg),
        "batch_size": cfg.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "matmul_size": args.matmul_size,
        "fused_kernels": not args.eager_kernels,
        "compile": args.compile,
    }
    return [
        {**common, "task": task, "mode": mode}
        for task in TASKS
        if task in args.tasks
        for mode in args.modes
    ]  # eager first: the baseline is measured before the fast paths


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(cfg: argparse.Namespace, results: list[Result], flops: float) -> dict[str, Any]:
    device = torch.device(cfg.device)
    on_gpu = device.type == "cuda"
    samples = [rate for r in results for rate in r.matmul_flops_per_s]
    return {
        "recipe": cfg.config or "(defaults)",
        "batch_size": cfg.batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_dtype": "bfloat16" if on_gpu else "float32",
        "matmul_flops_per_s_median": statistics.median(samples),
        "forward_flops_per_image": flops,
        "train_flops_per_image": TRAIN_FLOPS_PER_FORWARD * flops,
        "memory": "torch.cuda.max_memory_allocated" if on_gpu else "peak RSS (VmHWM)",
    }


def timed_document(args: argparse.Namespace, cfg: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run the timed tasks, each in its own process: their JSON entries and their report."""
    forward_flops = count_forward_flops(cfg)
    results = []
    with tempfile.TemporaryDirectory(prefix="statten-bench-") as tmp:
        for spec in _specs(args, cfg):
            result = run_isolated(spec, Path(tmp))
            per_forward = forward_flops * spec["batch_size"]
            result.flops_per_step = per_forward * (
                TRAIN_FLOPS_PER_FORWARD if spec["task"] == "train" else 1
            )
            result.summarize()
            results.append(result)
    summary = _summary(cfg, results, forward_flops)
    if "infer" in args.tasks:
        summary["inference_mean_firing_rate"] = inference_firing_rate(cfg)
    summary["ratios"] = _ratios({(r.task, r.mode): r for r in results})
    document = {**summary, "results": [asdict(r) for r in results]}
    return document, _report(summary, results)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables, write ``--json``; return the JSON document."""
    args, rest = _parser().parse_known_args(argv)
    cfg = parse_config(rest, "train")
    document: dict[str, Any] = {"recipe": cfg.config or "(defaults)"}
    reports = []
    if set(args.tasks) & set(TASKS):
        timed, report = timed_document(args, cfg)
        document.update(timed)
        reports.append(report)
    if ATTENTION_TASK in args.tasks:
        attention = attention_cost_document(cfg, args.attention_time_steps, args.attention_repeats)
        document["attention_cost"] = attention
        reports.append(_attention_report(attention))
    document["config"] = config_to_dict(cfg)
    print("\n\n".join(reports))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(document, indent=2))
    return document


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        main()
