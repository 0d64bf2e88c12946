"""How far fast inference lands from the eval model it was made from, on the golden sdt models.

Fast inference folds BatchNorm into the convolutions and computes spike convolutions in another
way than oneDNN's float32 product (spike-driven sums, or exact int8 sums), so a membrane potential
within rounding error of a threshold can fire on one side and not the other. This counts, over
``--batches`` batches of the golden cases' 3 reference inputs and 13 random ones, the share of
all spikes that flip, the logits that move by more than 1e-4, and the reference inputs' largest
distance from the golden logits, for each dense product a layer can take (every spike-fed
convolution forced to oneDNN's float32 product, or to the int8 one where this machine runs it).

    .venv/bin/python benchmarks/fast_inference_deviation.py [--batches 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import statten
from statten.analysis import SpikeRecorder
from statten.fast import integer_conv, optimize_for_inference
from statten.fast.spike_conv import SpikeConv2d

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from conftest import golden_model_config  # noqa: E402

CASES = ("static_sdt", "static_statten")


def outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the spikes of every neuron layer, by layer."""
    with torch.inference_mode(), SpikeRecorder(model, keep_spikes=True) as recorder:
        logits = model(x)
    return logits, [spikes for calls in recorder.spikes.values() for spikes in calls]


def deviation(case: str, integer: bool, batches: int) -> dict[str, float]:
    golden = torch.load(TESTS / "data" / f"{case}.pt", weights_only=True)
    model = statten.create_model("sdt", **golden_model_config(golden["config"]))
    statten.load_checkpoint(model, golden["state_dict"], strict=True)
    model.eval()
    fast = optimize_for_inference(model, compile_kernels=False)
    for conv in fast.modules():
        if isinstance(conv, SpikeConv2d):
            conv.max_density, conv.integer_products = 0.0, integer
    flipped = spikes_total = moved = logits_total = 0
    largest = golden_distance = 0.0
    for batch in range(batches):
        generator = torch.Generator().manual_seed(batch)
        noise = torch.randn(13, *golden["input"].shape[1:], generator=generator)
        x = torch.cat([golden["input"], noise])
        logits, spikes = outputs(model, x)
        fast_logits, fast_spikes = outputs(fast, x.contiguous(memory_format=torch.channels_last))
        flipped += sum((a != b).sum().item() for a, b in zip(spikes, fast_spikes, strict=True))
        spikes_total += sum(a.numel() for a in spikes)
        distance = (fast_logits - logits).abs()
        moved += (distance > 1e-4).sum().item()
        logits_total += distance.numel()
        largest = max(largest, distance.max().item())
        golden_distance = max(
            golden_distance, (fast_logits[:3] - golden["logits_eval"]).abs().max().item()
        )
    return {
        "flipped": flipped / spikes_total,
        "moved": moved,
        "logits": logits_total,
        "largest": largest,
        "golden": golden_distance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    products = [False, True] if integer_conv.available() else [False]
    for case in CASES:
        for integer in products:
            d = deviation(case, integer, args.batches)
            print(
                f"{case:15s} {'int8' if integer else 'float32':8s} {d['flipped']:.2e} of the "
                f"spikes flipped, {d['moved']}/{d['logits']} logits moved > 1e-4 (at most "
                f"{d['largest']:.3f}), reference logits within {d['golden']:.1e} of the golden",
                flush=True,
            )


if __name__ == "__main__":
    main()
