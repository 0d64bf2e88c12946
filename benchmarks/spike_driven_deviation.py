"""How far spike-driven training (``--spike-driven``) lands from the exact path.

Two measurements, for docs/performance.md:

1. Gradients of one training step of the CIFAR-10 2-512 model (batch 16, random images, the
   exact model's weights copied into the spike-driven one): per parameter, the norm of the
   difference over the norm of the exact gradient (floored at 1 % of the largest gradient norm,
   for the biases in front of a training BatchNorm whose true gradient is 0). Once with every
   spike-fed convolution forced spike-driven (the worst case), once with measured crossovers
   (what a user gets). Also the share of all spikes of the step that differ.
2. The default digits recipe trimmed to ``--epochs`` epochs, exact and spike-driven, for each of
   ``--seeds``: final validation top-1 and training loss.

    .venv/bin/python benchmarks/spike_driven_deviation.py [--epochs 10] [--seeds 0 1 2]
        [--json F]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import statten
from statten.analysis import SpikeRecorder
from statten.cli import main as statten_main
from statten.fast.spike_conv import SpikeConv2d

RECIPE = {"embed_dims": 512, "num_heads": 8, "mlp_ratio": 4, "T": 4, "num_classes": 10}
RECIPE |= {"depths": 2, "img_size": 32, "pooling_stat": "0011"}


def gradients(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The parameter gradients of one step, and the spikes of every neuron layer in it."""
    model.zero_grad(set_to_none=True)
    with SpikeRecorder(model, keep_spikes=True) as recorder:
        F.cross_entropy(model(images), targets).backward()
    spikes = [calls[0] for calls in recorder.spikes.values()]
    return {name: p.grad.clone() for name, p in model.named_parameters()}, spikes


def gradient_deviation(batch: int, forced: bool) -> dict[str, float]:
    """Largest and median relative gradient error of the spike-driven step (see the docstring)."""
    torch.manual_seed(0)
    exact = statten.create_model("sdt", **RECIPE).train()
    spike_driven = statten.create_model("sdt", **RECIPE, spike_driven=True).train()
    spike_driven.load_state_dict(exact.state_dict())
    images, targets = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if forced:
        for module in spike_driven.modules():
            if isinstance(module, SpikeConv2d):
                module.max_density = module.max_density_weight_grad = 1.0
    else:
        gradients(spike_driven, images, targets)  # the crossovers are measured in this step
        spike_driven.load_state_dict(exact.state_dict())  # undo the BatchNorm statistics' update
    want, want_spikes = gradients(exact, images, targets)
    got, got_spikes = gradients(spike_driven, images, targets)
    floor = max(g.norm() for g in want.values()) * 1e-2
    errors = [((got[k] - w).norm() / w.norm().clamp_min(floor)).item() for k, w in want.items()]
    flipped = sum((a != b).sum().item() for a, b in zip(want_spikes, got_spikes, strict=True))
    total = sum(a.numel() for a in want_spikes)
    return {"max": max(errors), "median": statistics.median(errors), "flipped": flipped / total}


def digits_run(output: Path, seed: int, epochs: int, spike_driven: bool) -> dict[str, float]:
    name = f"seed{seed}-{'spike' if spike_driven else 'exact'}"
    args = ["train", "--output", str(output), "--experiment", name]
    args += ["--epochs", str(epochs), "--seed", str(seed)]
    if statten_main(args + (["--spike-driven"] if spike_driven else [])) != 0:
        raise RuntimeError(f"statten {' '.join(args)} failed")
    with open(output / "train" / name / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {"eval_top1": float(last["eval_top1"]), "train_loss": float(last["train_loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: gradients only"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result: dict = {"gradients": {}, "digits": {}}
    for label, forced in (("forced", True), ("measured", False)):
        deviation = gradient_deviation(args.batch, forced)
        result["gradients"][label] = deviation
        print(f"CIFAR-10 2-512 gradients, {label} crossovers: relative error max "
              f"{deviation['max']:.2e}, median {deviation['median']:.2e}; "
              f"{deviation['flipped']:.2e} of all spikes flipped", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            runs = {
                mode: digits_run(Path(scratch), seed, args.epochs, mode == "spike-driven")
                for mode in ("exact", "spike-driven")
            }
            result["digits"][seed] = runs
            print(f"digits {args.epochs} epochs, seed {seed}: " + ", ".join(
                f"{mode} top-1 {r['eval_top1']:.2f} loss {r['train_loss']:.4f}"
                for mode, r in runs.items()
            ), flush=True)  # fmt: skip
    if args.seeds:
        differences = [r["spike-driven"]["eval_top1"] - r["exact"]["eval_top1"]
                       for r in result["digits"].values()]  # fmt: skip
        print(f"top-1 difference (spike-driven - exact): mean "
              f"{statistics.fmean(differences):+.2f} points, per seed "
              f"{', '.join(f'{d:+.2f}' for d in differences)}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
