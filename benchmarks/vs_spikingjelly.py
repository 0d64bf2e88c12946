"""Training step of statten's sdt against SpikingJelly 2.x's own ``SpikeDrivenTransformer``.

The goal of the speed issue: on the path a user gets by default, peak training memory <= 0.5x
SpikingJelly's SDT at the same batch and speed >= 1.0x. Both models take the configuration of
``conf/cifar10/2_512_200E_t4.yml`` (2 blocks, D 512, 8 heads, MLP ratio 4, T 4, pooling 0011,
32 px, 10 classes; SpikingJelly's LIF with tau 2, hard reset, detached reset, sigmoid surrogate
alpha 4, as the reference), a random batch, cross-entropy on the time-averaged logits and AdamW.

Each variant runs in its own process (peak RSS, ``VmHWM``, is per process), the processes
alternate over ``--rounds`` so that a slow spell of the machine hits every variant; the speed is
the median step time over all rounds. Variants: ``spikingjelly``, ``statten`` (``create_model``
as a user gets it), ``statten-plain`` (``memory_efficient=False``) and ``statten-spike``
(``spike_driven=True``: convolutions fed spikes compute their output and weight gradient from the
spikes where each layer measured that faster; the warm-up step measures the crossovers) and
``statten-heap-kept`` (the default model with ``statten.fast.use_heap_release(False)``: glibc
keeps the forward pass's freed memory in its heap; not run unless asked for).

    .venv/bin/python benchmarks/vs_spikingjelly.py [--batch 16] [--steps 5] [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from timing import wall_times

from statten.bench import peak_rss_bytes

RECIPE = {"embed_dims": 512, "num_heads": 8, "mlp_ratio": 4, "T": 4, "num_classes": 10}
VARIANTS = ("spikingjelly", "statten", "statten-plain", "statten-spike", "statten-heap-kept")
OPTIONS = {
    "statten": {},
    "statten-plain": {"memory_efficient": False},
    "statten-spike": {"spike_driven": True},
    "statten-heap-kept": {},
}


def build(variant: str) -> torch.nn.Module:
    """The model of ``variant`` in training mode."""
    if variant == "spikingjelly":
        from spikingjelly.activation_based import neuron, surrogate
        from spikingjelly.activation_based.model import SpikeDrivenTransformer

        return SpikeDrivenTransformer(
            **RECIPE, depths=2, in_channels=3, pooling_stat="0011",
            spiking_neuron=neuron.LIFNode, tau=2.0, detach_reset=True,
            surrogate_function=surrogate.Sigmoid(alpha=4.0),
        ).train()  # fmt: skip
    import statten
    from statten.fast import use_heap_release

    use_heap_release(variant != "statten-heap-kept")
    return statten.create_model(
        "sdt", **RECIPE, depths=2, img_size=32, pooling_stat="0011", **OPTIONS[variant]
    ).train()


def measure(variant: str, batch: int, steps: int) -> dict[str, float | list[float]]:
    """Step times and peak RSS of ``steps`` AdamW training steps (after one warm-up step)."""
    torch.manual_seed(0)
    model = build(variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    after_build = peak_rss_bytes()

    def step() -> None:
        logits = model(images)
        logits = logits.mean(0) if logits.dim() == 3 else logits
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        functional.reset_net(model)  # SpikingJelly's neurons keep their state; statten's do not

    seconds = wall_times(step, steps)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_after_build": after_build}


def run_isolated(variant: str, batch: int, steps: int) -> dict[str, float | list[float]]:
    """:func:`measure` in a fresh Python process."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import vs_spikingjelly as b; "
        f"print(json.dumps(b.measure({variant!r}, {batch}, {steps})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:4]))
    args = parser.parse_args()
    if "spikingjelly" not in args.variants:
        parser.error("--variants must include spikingjelly, the baseline")
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            runs[variant].append(run_isolated(variant, args.batch, args.steps))
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {
            "step_seconds_median": statistics.median(s for r in results for s in r["seconds"]),
            "peak_rss_bytes": max(r["peak_rss"] for r in results),
        }
    base = summary["spikingjelly"]
    print(
        f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, torch {torch.__version__}"
    )
    print(f"{'variant':<18} {'step s':>8} {'speed vs SJ':>12} {'peak RSS MiB':>13} {'vs SJ':>7}")
    for variant, row in summary.items():
        row["speed_vs_spikingjelly"] = base["step_seconds_median"] / row["step_seconds_median"]
        row["peak_rss_vs_spikingjelly"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        print(
            f"{variant:<18} {row['step_seconds_median']:>8.3f} "
            f"{row['speed_vs_spikingjelly']:>11.2f}x {row['peak_rss_bytes'] / 2**20:>13.0f} "
            f"{row['peak_rss_vs_spikingjelly']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "summary": summary, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
