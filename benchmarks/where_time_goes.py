"""Where a training step spends its time and what it stores for backward (docs/performance.md).

Profiles one training step (after two warm-up steps) of the plain model
(``memory_efficient=False``), of the model as ``create_model`` builds it (memory-efficient) and of
the fast path (``statten.fast.optimize_for_training``: also channels-last) with
``torch.profiler`` and groups the self CPU time of the operators by kind; then counts the bytes a
forward pass keeps for backward, by the layer that saves them. All on CPU at the given batch
size.

    python benchmarks/where_time_goes.py [-c conf/cifar10/2_512_200E_t4.yml] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from statten.config import model_config, parse_config
from statten.factory import create_model
from statten.fast import optimize_for_training
from statten.fast.functions import record_saved_tensors

KINDS = {  # operator-name fragment -> kind, first match wins
    "statten::lif": "fused LIF kernels (C)",
    "convolution": "conv (forward, backward)",
    "batch_norm": "BatchNorm",
    "compiledfxgraph": "fused LIF kernels (compiled)",
    "max_pool": "max pooling",
    "max_unpool": "max pooling",
    "scatter": "max pooling",
    "bmm": "attention products",
    "adam": "optimizer",
    "lerp": "optimizer",
    "addcdiv": "optimizer",
    "addcmul": "optimizer",
    "sqrt": "optimizer",
    "copy_": "copies, dtype conversions",
    "cat": "stack/cat (per-step LIF outputs)",
    "stack": "stack/cat (per-step LIF outputs)",
}


def _kind(name: str) -> str:
    lowered = name.lower()
    default = "other element-wise (eager: mostly LIF steps)"
    return next((kind for key, kind in KINDS.items() if key in lowered), default)


def time_by_kind(model: torch.nn.Module, images: torch.Tensor) -> Counter:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    targets = torch.zeros(len(images), dtype=torch.long)

    def step() -> None:
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds: Counter = Counter()
    for event in prof.key_averages():
        seconds[_kind(event.key)] += event.self_cpu_time_total / 1e6
    return seconds


def saved_bytes_by_layer(model: torch.nn.Module, images: torch.Tensor) -> Counter:
    """Bytes of the distinct storages kept for backward, by the kind of layer that saved them."""
    current = ["(other)"]
    for name, module in model.named_modules():
        label = name.rsplit(".", 1)[-1].rstrip("0123456789") or "(model)"
        module.register_forward_pre_hook(lambda m, i, label=label: current.__setitem__(0, label))
    seen: dict[int, int] = {}
    by_layer: Counter = Counter()

    def record(tensor: torch.Tensor, owner: str | None) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen[storage.data_ptr()] = storage.nbytes()
            label = current[0] if owner is None else f"{owner} ctx"
            by_layer[f"{label} ({tensor.dtype})".replace("torch.", "")] += storage.nbytes()

    record_saved_tensors(lambda: model(images), record)
    return by_layer


def _table(title: str, counts: Counter, unit: str, scale: float) -> str:
    total = sum(counts.values())
    lines = [f"{title}: {total * scale:,.2f} {unit}"]
    for kind, value in counts.most_common():
        lines.append(f"  {value * scale:10,.2f} {unit} {100 * value / total:5.1f}%  {kind}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="conf/cifar10/2_512_200E_t4.yml")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    cfg = parse_config(["-c", args.config], "train")
    torch.manual_seed(0)
    default = create_model(cfg.model, **model_config(cfg)).train()
    plain = copy.deepcopy(default)
    plain.memory_efficient = False
    fast = optimize_for_training(copy.deepcopy(default))
    images = torch.randn(args.batch, default.in_channels, default.img_size, default.img_size)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    for name, model, x in (
        ("plain (memory_efficient=False)", plain, images),
        ("default (as create_model builds it)", default, images),
        ("fast (optimize_for_training)", fast, channels_last),
    ):
        print(_table(f"{name}: self CPU time of one training step", time_by_kind(model, x), "s", 1))
        saved = saved_bytes_by_layer(model, x)
        print(_table(f"{name}: stored for backward", saved, "MiB", 2**-20), "\n", flush=True)


if __name__ == "__main__":
    main()
