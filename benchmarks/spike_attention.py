"""Spike-driven STAtten attention (``statten/fast/attention.c``) versus the torch products on CPU.

For each family's CIFAR-10 STAtten recipe at batch 16, the model is built with its BatchNorm
calibrated as ``statten bench`` does (so its layers fire as in training), the Q, K, V spikes of
its first attention layer are recorded, laid out as a channels-last fast-inference model holds
them (tokens outermost, channels innermost), and the attention is timed both ways: the torch
products (blocks copied out of Q, K, V, two matmuls, the output copied back) and the C kernel
(no copies, work in proportion to the spikes). Also prints the largest difference between the
two, relative to the largest output.

    python benchmarks/spike_attention.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools

import torch
from timing import best_ms

from statten import bench
from statten.attention import SpatioTemporalAttention
from statten.config import parse_config

RECIPES = [
    "conf/cifar10/2_512_200E_t4.yml",
    "conf/spikformer/cifar10_4_384_400E_t4_statten.yml",
    "conf/qkformer/cifar10_hst_4_384_400E_t4_statten.yml",
    "conf/sdtv2/cifar10_8_256_t4_statten.yml",
]


def recorded_inputs(recipe: str) -> tuple[SpatioTemporalAttention, tuple, float]:
    """The first attention layer of the recipe's calibrated model, its ``(q, k, v)`` in the
    token-major layout, and its scale."""
    cfg = parse_config(["-c", recipe, "-b", "16", "--device", "cpu"], "train")
    torch.manual_seed(cfg.seed)
    model, images = bench.inference_model(cfg, 16, torch.device("cpu"))
    layer = next(m for m in model.modules() if isinstance(m, SpatioTemporalAttention))
    seen = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("inputs", (args, kwargs))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.inference_mode():
        model(images)
    handle.remove()
    args, kwargs = seen["inputs"]
    q, k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in args[:3])
    scale = args[3] if len(args) > 3 else kwargs.get("scale", 1.0)
    return layer, (q, k, v), scale


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{'recipe':52s} {'T,B,heads,N,d':>20s} chunk density  torch ms  C ms  max rel diff")
    for recipe in RECIPES:
        layer, (q, k, v), scale = recorded_inputs(recipe)
        products = SpatioTemporalAttention(layer.chunk_size)
        kernel = SpatioTemporalAttention(layer.chunk_size)
        kernel.spike_driven_inference = True
        expected, out = products(q, k, v, scale), kernel(q, k, v, scale)
        torch_ms = best_ms(functools.partial(products, q, k, v, scale), args.repeats)
        c_ms = best_ms(functools.partial(kernel, q, k, v, scale), args.repeats)
        density = torch.stack([x.mean() for x in (q, k, v)]).mean().item()
        diff = ((out - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        shape = ",".join(map(str, q.shape))
        print(
            f"{recipe:52s} {shape:>20s} {layer.chunk_size:5d} {density:7.3f} {torch_ms:9.2f} "
            f"{c_ms:5.2f} {diff:12.1e}"
        )


if __name__ == "__main__":
    main()
